-- wrk script: POST one image as multipart/form-data to /v1/classify.
-- IMAGE names the file (a 640x480 JPEG made by bench/serve_load.py).
local path = os.getenv("IMAGE")
local file = assert(io.open(path, "rb"), "set IMAGE to a readable image file")
local image = file:read("*all")
file:close()

local boundary = "crossvit-bench-boundary"
wrk.method = "POST"
wrk.headers["Content-Type"] = "multipart/form-data; boundary=" .. boundary
wrk.body = "--" .. boundary .. "\r\n"
  .. 'Content-Disposition: form-data; name="images"; filename="bench.jpg"\r\n'
  .. "Content-Type: image/jpeg\r\n\r\n"
  .. image .. "\r\n--" .. boundary .. "--\r\n"

-- no response() callback: it would make wrk parse every body and cost client CPU
function done(summary, latency, requests)
  io.write(string.format("NON200 %d\n", summary.errors.status))
end
