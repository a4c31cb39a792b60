"""A stand-in for vLLM's OpenAI server, for tests without vLLM: same command line, `/health`, `/v1/models`,
chat completions.

Run as ``python -m tests.fake_vllm --model DIR --served-model-name NAME --port P ...`` (the arguments
`VLLMServer` gives vLLM). It answers chat completions with the scripted teacher of `tests.harvest_driver`
and logs vLLM's concurrency line. The environment steers it:

- ``FAKE_VLLM_FAIL``: print this text to the log and exit with code 1 instead of serving (a failed start).
- ``FAKE_VLLM_DIE_AFTER``: exit (code 137, as if killed) after answering this many completions.
- ``FAKE_VLLM_MAX_PROMPT``: answer 400 with vLLM's context-length message to prompts longer than this (chars).
- ``FAKE_VLLM_STARTUP_S``: seconds to wait before serving.
- ``FAKE_VLLM_REPLY_S``: seconds each completion takes before its first byte (a busy CPU server).
- ``FAKE_VLLM_ENGINE``: start a child process in the server's process group, as vLLM's engine core is, and log
  its pid (``engine pid N``).
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.harvest_driver import script
from tests.scripted import ScriptedEngine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--served-model-name")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int)
    args, _ = parser.parse_known_args()
    if os.environ.get("FAKE_VLLM_FAIL"):
        print(os.environ["FAKE_VLLM_FAIL"], flush=True)
        sys.exit(1)
    time.sleep(float(os.environ.get("FAKE_VLLM_STARTUP_S", "0")))
    if os.environ.get("FAKE_VLLM_ENGINE"):
        engine_core = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print(f"engine pid {engine_core.pid}", flush=True)
    print("CPU KV cache size: 40,960 tokens, Maximum concurrency for 8,192 tokens per request: 5.00x", flush=True)
    rationales, answers = script(48)
    engine = ScriptedEngine(rationales, answers)
    die_after = int(os.environ.get("FAKE_VLLM_DIE_AFTER", "0"))
    max_prompt = int(os.environ.get("FAKE_VLLM_MAX_PROMPT", "0"))
    served = [0]
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_):
            pass

        def do_GET(self):
            if self.path == "/health":
                self._send(200, {"status": "ok"})
            elif self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": args.served_model_name, "object": "model"}]})
            else:
                self._send(200, {"object": "list", "data": []})

        def do_POST(self):
            if self.path == "/reset_prefix_cache":
                self._send(200, {})
                return
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            texts = [_text(m["content"]) for m in body["messages"]]
            user, prompt = texts[-1], sum(len(text) for text in texts)
            if max_prompt and prompt > max_prompt:
                message = f"This model's maximum context length is {max_prompt} tokens. However, your request has {prompt} input tokens."
                self._send(400, {"object": "error", "message": message, "type": "BadRequestError", "code": 400})
                return
            time.sleep(float(os.environ.get("FAKE_VLLM_REPLY_S", "0")))
            try:
                text = engine.reply(user)
            except (AttributeError, KeyError):  # not a scripted question: a plain reply
                text = "[[ ## answer ## ]]\nunknown\n\n[[ ## completed ## ]]"
            self._send(200, _completion(args.served_model_name, text, prompt))
            with lock:
                served[0] += 1
                if die_after and served[0] >= die_after:
                    os._exit(137)

        def _send(self, status, payload):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()


def _text(content) -> str:
    """A message's text: a string, or OpenAI's list of content parts."""
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


def _completion(model: str, text: str, prompt_chars: int) -> dict:
    prompt_tokens = max(1, prompt_chars // 4)
    return {
        "id": "fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(text) // 4,
            "total_tokens": prompt_tokens + len(text) // 4,
            "prompt_tokens_details": {"cached_tokens": prompt_tokens // 2},
        },
    }


if __name__ == "__main__":
    main()
