"""A webhook receiver that verifies signatures with the PyPI `standardwebhooks` package, an
implementation Sluice did not write.

Usage: receiver.py SECRET LOG_FILE
Listens on 127.0.0.1 on an ephemeral port and prints `listening PORT` once ready. Answers 204
when the signature verifies and 401 otherwise, and appends `<webhook-id> ok|bad` to LOG_FILE for
every request.
"""

import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

SECRET, LOG = sys.argv[1], sys.argv[2]
WEBHOOK = Webhook(SECRET)


class Handler(BaseHTTPRequestHandler):
    # Keep-alive, as the executor's client expects.
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        try:
            WEBHOOK.verify(body, dict(self.headers.items()), json_parse=True)
            verdict, code = "ok", 204
        except WebhookVerificationError as e:
            verdict, code = "bad", 401
            sys.stderr.write(f"verification failed: {e}\n")
        with open(LOG, "a", encoding="utf-8") as log:
            log.write(f"{self.headers.get('webhook-id')} {verdict}\n")
        self.send_response(code)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format, *args):
        pass


server = HTTPServer(("127.0.0.1", 0), Handler)
print(f"listening {server.server_address[1]}", flush=True)
server.serve_forever()
