"""The export as an MLflow pyfunc: logged into a run, registered, loaded back, tagged with the
evaluate numbers, and served by a real `mlflow models serve` process over HTTP.

One tiny random export is logged and registered once per module in a tmp sqlite store; every
answer is checked for the words the request fixed (spaces removed: a generated WordPiece may be a
`##` continuation glued to its neighbour).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.serving import registry
from pipeline.tracking import runs
from tests.support.env import PROJECT_ENV, without_project_env
from tests.support.exports import export_tiny

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:Operation with range is deprecated"),  # MLflow's own pandas call
]

NAME = "dbert-serving-test"
READY_TIMEOUT_S = 300  # the server imports torch and transformers and loads the model, on a busy 2-core machine
PROMPT = {"prompt": "the cat sat", "length": 3, "steps": 4, "seed": 1}
INFILL = {"infill": "the [MASK*2] on the mat .", "num": 2, "steps": 4}


@dataclass
class Registered:
    root: Path
    uri: str  # the tmp store
    run_id: str
    version: object  # mlflow ModelVersion

    @property
    def model_uri(self) -> str:
        return f"models:/{NAME}/{self.version.version}"  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """The tiny export logged into a train run of a tmp store and registered as NAME."""
    import mlflow

    mp = without_project_env()
    root = tmp_path_factory.mktemp("serving")
    export = export_tiny(root / "export")
    try:
        with runs.start_stage_run("train", {"train": {"steps": 4}}, experiment="serving", root=root) as run:
            version = registry.log_and_register(export, NAME)
        assert version is not None, "registration failed"
        yield Registered(root, mlflow.get_tracking_uri(), run.info.run_id, version)
    finally:
        mlflow.set_tracking_uri(None)
        mp.undo()


@pytest.fixture
def store(registered, monkeypatch):
    """This test talks to the module's store."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered.uri)
    mlflow.set_tracking_uri(registered.uri)
    yield registered
    mlflow.set_tracking_uri(None)


def squeezed(text: str) -> str:
    return "".join(text.split())


def assert_keeps_the_fixed_words(answers: list[dict]) -> None:
    """Answers as records (row, request, text): each keeps its request's fixed words, in order."""
    for answer in answers:
        if answer["row"] == 0:
            assert squeezed(answer["text"]).startswith("thecatsat"), answer
        else:
            text = squeezed(answer["text"])
            assert text.startswith("the") and text.endswith("onthemat."), answer


def test_a_registered_version_is_the_train_run_s_pyfunc_with_code_signature_and_export(store):
    import mlflow

    version = store.version
    assert version.run_id == store.run_id and version.tags == {"source_stage": "train"}
    local = Path(mlflow.artifacts.download_artifacts(store.model_uri))
    assert (local / "code" / "pipeline" / "api.py").is_file()  # the package travels with the model
    assert (local / "artifacts" / "export" / "diffusion_schedule.json").is_file()
    info = mlflow.models.get_model_info(store.model_uri)
    assert [c["name"] for c in info.signature.inputs.to_dict()][:2] == ["prompt", "infill"]
    assert {p.name for p in info.signature.params.params} == {
        "steps",
        "sampler",
        "top_k",
        "top_p",
        "temperature",
        "seed",
    }
    assert (local / "serving_input_example.json").is_file()


def test_the_loaded_pyfunc_answers_prompt_infill_and_unconditional_rows(store):
    import mlflow
    import pandas as pd

    model = mlflow.pyfunc.load_model(store.model_uri)
    table = pd.DataFrame([PROMPT, INFILL, {"length": 5}])
    out = model.predict(table, params={"steps": 2, "seed": 3})
    assert list(out.columns) == ["row", "request", "text"]
    assert out["row"].tolist() == [0, 1, 1, 2]  # num=2 for the infill row
    assert out["request"].tolist() == ["the cat sat", INFILL["infill"], INFILL["infill"], ""]
    assert_keeps_the_fixed_words(out.iloc[:3].to_dict(orient="records"))
    assert out.iloc[3]["text"].strip()
    again = model.predict(table, params={"steps": 2, "seed": 3})
    assert again.equals(out)  # seeded, and each row sampled on its own
    assert model.predict([PROMPT]).iloc[0].to_dict() == out.iloc[0].to_dict()  # a list of dicts; its own values win
    with pytest.raises(Exception, match="row 0: give a prompt or an infill template, not both"):
        model.predict(pd.DataFrame([{"prompt": "a", "infill": "b [MASK]"}]))


def test_the_served_model_goes_where_dbert_device_says_and_names_a_gpu_that_is_not_there(store, monkeypatch):
    import mlflow
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("DBERT_DEVICE", raising=False)
    served = mlflow.pyfunc.load_model(store.model_uri).unwrap_python_model().model
    assert served.model.device.type == "cpu"  # auto, without a GPU
    monkeypatch.setenv("DBERT_DEVICE", "cuda")
    with pytest.raises(Exception, match="no CUDA GPU is visible"):
        mlflow.pyfunc.load_model(store.model_uri)


def test_evaluate_metrics_become_tags_of_the_version_the_train_run_registered(store):
    import mlflow

    metrics = {"bound.ppl_token_mean": 812.25, "leaky": False, "generation.bleu": float("nan"), "label": "x"}
    tagged = registry.attach_metrics(store.run_id, metrics, evaluate_run_id="e1")
    assert tagged == [f"{NAME}/{store.version.version}"]
    tags = mlflow.MlflowClient().get_model_version(NAME, store.version.version).tags
    assert tags["metric.bound.ppl_token_mean"] == "812.25" and tags["metric.leaky"] == "0"
    assert tags["evaluate_mlflow_run_id"] == "e1"
    assert "metric.generation.bleu" not in tags and "metric.label" not in tags  # finite numbers only
    assert registry.attach_metrics(None, metrics) == [] and registry.attach_metrics("no-such-run", metrics) == []


def test_a_registry_or_logging_failure_is_a_warning_not_a_failed_training(store, monkeypatch, caplog):
    import mlflow
    from mlflow.exceptions import MlflowException

    def refuse(*args, **kwargs):
        raise MlflowException("model registry unavailable")

    monkeypatch.setattr(registry, "log_pyfunc", lambda export_dir: SimpleNamespace(model_uri="models:/m-1"))
    monkeypatch.setattr(mlflow, "register_model", refuse)
    caplog.set_level(logging.WARNING, logger=registry.__name__)
    with mlflow.start_run():
        assert registry.log_and_register(store.root / "export", NAME) is None
        assert "could not register the model as 'dbert-serving-test'" in caplog.text
        assert "model registry unavailable" in caplog.text and "models:/m-1" in caplog.text
        assert registry.log_and_register(store.root / "export", "") is None  # registration off: no attempt
        monkeypatch.setattr(registry, "log_pyfunc", refuse)
        caplog.clear()
        assert registry.log_and_register(store.root / "export", NAME) is None
        assert "could not log the model as an MLflow pyfunc" in caplog.text
    caplog.clear()
    assert registry.log_and_register(store.root / "export", NAME) is None  # no active run
    assert "no active MLflow run" in caplog.text


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        raise AssertionError(f"{err.code}: {err.read().decode(errors='replace')}") from None


def wait_until_ready(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        assert proc.poll() is None, f"mlflow models serve exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no /ping answer after {READY_TIMEOUT_S} s:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)


def test_mlflow_models_serve_answers_prompt_and_infill_requests_over_http(registered, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k not in PROJECT_ENV}
    env["MLFLOW_TRACKING_URI"] = registered.uri
    # It execs `uvicorn` by name: the virtualenv's bin must be on PATH, as in an activated venv.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", registered.model_uri]
    command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:  # cwd outside the checkout: `pipeline` comes from the model's code/
        proc = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_until_ready(url, proc, log)
        answer = post(f"{url}/invocations", {"dataframe_records": [PROMPT, INFILL]})
        records = answer["predictions"]
        assert [r["row"] for r in records] == [0, 1, 1]
        assert_keeps_the_fixed_words(records)
        shared = post(
            f"{url}/invocations", {"dataframe_records": [{"infill": "[MASK] likes tea ."}], "params": {"steps": 2}}
        )
        assert squeezed(shared["predictions"][0]["text"]).endswith("likestea.")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
