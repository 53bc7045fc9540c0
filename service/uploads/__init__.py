"""A request body to images: the byte budget and timeouts (bodies.py), then by Content-Type the
multipart reader (formparts.py), the streaming JSON scanner (jsonimages.py) or a raw image (inputs.py)."""
