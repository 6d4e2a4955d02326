"""A minimal OpenAI-style /v1/completions server over llama-cpp-python, standard library only.

server_load.py runs it, one process per tenant, when the Python given by --llama-python has
`llama_cpp` but not the extras `llama_cpp.server` needs (fastapi, uvicorn, sse-starlette,
starlette-context, pydantic-settings). It serves requests one at a time, as
`llama_cpp.server` does (one lock around the model), and streams one SSE event per token.

    python benchmarks/llama_cpp_server.py --model PATH --port P [--n_threads 2] [--n_ctx 2048]
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from llama_cpp import Llama


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--n_threads", type=int, default=2)
    parser.add_argument("--n_ctx", type=int, default=2048)
    args = parser.parse_args()
    llm = Llama(args.model, n_ctx=args.n_ctx, n_threads=args.n_threads, n_threads_batch=args.n_threads, verbose=False)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a) -> None:  # quiet
            pass

        def _json(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path in ("/health", "/v1/models"):
                self._json(200, {"status": "ok", "object": "list", "data": [{"id": "model", "object": "model"}]})
            else:
                self._json(404, {"error": {"message": "not found"}})

        def do_POST(self) -> None:
            if self.path != "/v1/completions":
                self._json(404, {"error": {"message": "not found"}})
                return
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
            kwargs = dict(
                prompt=body["prompt"], max_tokens=body.get("max_tokens", 16),
                temperature=body.get("temperature", 0.8), top_p=body.get("top_p", 0.95),
                top_k=body.get("top_k", 40), min_p=body.get("min_p", 0.05), seed=body.get("seed"),
                stop=body.get("stop"), repeat_penalty=body.get("repeat_penalty", 1.0),
            )
            with lock:
                if not body.get("stream"):
                    self._json(200, llm.create_completion(**kwargs))
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                n = 0
                finish = None
                for chunk in llm.create_completion(stream=True, **kwargs):
                    if chunk["choices"][0].get("text"):
                        n += 1
                    finish = chunk["choices"][0].get("finish_reason") or finish
                    self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                    self.wfile.flush()
                n_prompt = len(llm.tokenize(body["prompt"].encode()))
                usage = {"object": "text_completion", "created": int(time.time()), "choices": [],
                         "usage": {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}}
                self.wfile.write(b"data: " + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n")
                self.wfile.flush()
                self.close_connection = True

    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
