# Answers every POST with 503 + Retry-After: 5 and logs the time of each request.
import http.server, sys, time, json
t0 = time.time()
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        n = int(self.headers.get('content-length') or 0)
        self.rfile.read(n)
        print(json.dumps({"t": round(time.time()-t0, 2), "path": self.path}), flush=True)
        body = b'{"message":"not accepting messages for now","code":"backpressure"}'
        self.send_response(503)
        self.send_header('Retry-After', '5')
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()
