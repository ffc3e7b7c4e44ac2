"""The registered model served with `mlflow models serve` from a fresh environment (issue 12, item 6).

1. train + log: the tiny model of tests/integration/test_serving.py, trained in this process and
   logged/registered @champion by the same code (`test_serving.train_and_log`: trainers.tracking,
   sqlite tracking store and artifacts in a temp folder);
2. a brand-new virtualenv (`python -m venv`, not the project's .venv) under /tmp;
3. `pip install -r` the logged model's own requirements.txt (plus `mlflow` if it were not listed),
   with pip's configuration as it is on this machine; checked: the requirements pin the project's
   torch (so pip takes the local CPU wheel, never a CUDA build: no nvidia-* package may appear) and
   name no `itmatch` (the project's code travels in the model's code_paths: the fresh venv cannot
   import it);
4. that venv's `mlflow models serve -m models:/NAME@champion --env-manager local`, MLFLOW_TRACKING_URI
   at the sqlite store, its bin/ first on PATH (the server execs `uvicorn`), run from an empty
   folder with no PYTHONPATH;
5. POST a caption and a base64 PNG (plain and as a data: URL): the embeddings must equal the
   checkpoint's (computed here with the project's code, as test_serving.py does);
6. bad requests (an unknown column, an undecodable image) must get HTTP 400 with a one-line reason.

Prints a table (step, seconds, result) and exits non-zero if any step failed.

    .venv/bin/python bench/serve_fresh_env.py [--workdir /tmp/itm-fresh] [--keep] [--reuse-venv DIR]

--reuse-venv skips steps 2-3 (a rerun against a venv a previous run kept; its result is then not
"fresh"). Needs PyPI through pip's configured index (mlflow, transformers, ... are downloaded).
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "integration"))

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar line per file otherwise

import numpy as np  # noqa: E402

import test_serving as ts  # noqa: E402  (the serving test's model and helpers: one code path)

ROWS: list[tuple[str, float, str]] = []


class StepFailed(Exception):
    pass


def step(name: str):
    """Time a step; its function returns the result text or raises."""
    def wrap(fn):
        start = time.monotonic()
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - reported in the table
            ROWS.append((name, time.monotonic() - start, f"FAIL: {type(exc).__name__}: {exc}".splitlines()[0][:300]))
            if not isinstance(exc, StepFailed):
                traceback.print_exc()
            raise StepFailed(name) from exc
        ROWS.append((name, time.monotonic() - start, f"ok: {result}"))
        return result
    return wrap


def run(cmd: list[str], log: Path, **kw) -> subprocess.CompletedProcess:
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(map(str, cmd))}\n")
        out.flush()
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, **kw)
    if proc.returncode:
        raise StepFailed(f"{Path(cmd[0]).name} exited {proc.returncode}; tail of {log}:\n"
                         + "\n".join(log.read_text().splitlines()[-25:]))
    return proc


def clean_env(venv: Path, uri: str) -> dict[str, str]:
    """The environment of an activated fresh venv: nothing of the project's venv or source tree."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and not p.startswith(str(ROOT))]
    env.update(PATH=os.pathsep.join([str(venv / "bin"), *path]), VIRTUAL_ENV=str(venv), MLFLOW_TRACKING_URI=uri)
    return env


def wait_until_up(proc: subprocess.Popen, port: int, log: Path, timeout: float = 300) -> None:
    try:
        ts.wait_until_up(proc, port, log, timeout)
    except RuntimeError as exc:
        raise StepFailed(str(exc)) from None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new /tmp/itm-fresh-* folder")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (venv, store, logs)")
    parser.add_argument("--reuse-venv", type=Path, default=None, help="serve from this existing venv (not fresh)")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="itm-fresh-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    venv = args.reuse_venv or work / "venv"
    pip_log, serve_log = work / "pip.log", work / "serve.log"
    state: dict = {}
    proc = None
    failed = False
    try:
        @step("train + log + register (project .venv)")
        def _():
            tmp = work / "model"
            tmp.mkdir(exist_ok=True)
            state["tmp"], state["uri"], state["folder"], state["store"], state["info"] = ts.train_and_log(tmp)
            return f"{ts.NAME}@champion in {state['uri']}"

        @step("read the model's requirements.txt")
        def _():
            import mlflow

            mlflow.set_tracking_uri(state["uri"])
            local = Path(mlflow.artifacts.download_artifacts(f"models:/{ts.NAME}@champion",
                                                             dst_path=str(work / "download")))
            reqs = [r.strip() for r in (local / "requirements.txt").read_text().splitlines()
                    if r.strip() and not r.startswith("#")]
            names = {r.split(";")[0].replace(" ", "").lower() for r in reqs}
            torch_base = version("torch").split("+")[0]
            if f"torch=={torch_base}" not in names:
                raise StepFailed(f"requirements do not pin the project's torch=={torch_base}: {reqs}")
            if any(n.startswith("itmatch") for n in names):
                raise StepFailed(f"requirements name the project itself (pip cannot find it): {reqs}")
            missing = [w for w in ("pillow", "pyarrow", "numpy") if not any(n.startswith(w) for n in names)]
            if missing:
                raise StepFailed(f"requirements lack {missing}: {reqs}")
            if not any(n.startswith("mlflow") for n in names):
                reqs.append("mlflow")
            state["requirements"] = work / "requirements.txt"
            state["requirements"].write_text("\n".join(reqs) + "\n")
            return f"{len(reqs)} lines: {', '.join(reqs)}"

        if args.reuse_venv is None:
            @step("python -m venv (fresh, /tmp)")
            def _():
                if venv.exists():
                    shutil.rmtree(venv)
                base = getattr(sys, "_base_executable", None) or shutil.which("python3")
                run([base, "-m", "venv", str(venv)], pip_log)
                return f"{venv} ({base})"

            @step("pip install -r requirements.txt")
            def _():
                run([str(venv / "bin" / "python"), "-m", "pip", "install", "-r", str(state["requirements"])], pip_log,
                    cwd=work)
                return f"log {pip_log}"

        @step("check the fresh venv")
        def _():
            env = clean_env(venv, state["uri"])
            probe = ("import importlib.metadata as m, importlib.util as u, sys;"
                     "d=sorted(x.metadata['Name'] for x in m.distributions());"
                     "print(m.version('torch'), m.version('mlflow'), m.version('pillow'), m.version('pyarrow'));"
                     "print(sum(n.lower().startswith('nvidia') for n in d), len(d));"
                     "print(u.find_spec('itmatch') is None and u.find_spec('trainers') is None)")
            empty = work / "cwd"
            empty.mkdir(exist_ok=True)
            out = subprocess.run([str(venv / "bin" / "python"), "-c", probe], cwd=empty, env=env, capture_output=True,
                                 text=True, check=True).stdout.split("\n")
            torch_v, mlflow_v, pillow_v, pyarrow_v = out[0].split()
            nvidia, total = map(int, out[1].split())
            if not torch_v.endswith("+cpu") or nvidia:
                raise StepFailed(f"torch {torch_v}, {nvidia} nvidia-* packages: not the CPU build")
            if out[2] != "True":
                raise StepFailed("the fresh venv can import itmatch/trainers: the check would prove nothing")
            return (f"{total} dists; torch {torch_v}, mlflow {mlflow_v}, pillow {pillow_v}, pyarrow {pyarrow_v}; "
                    "no nvidia-*, itmatch not importable")

        @step("mlflow models serve (fresh venv) until /ping")
        def _():
            nonlocal proc
            port = ts._free_port()
            empty = work / "cwd"
            empty.mkdir(exist_ok=True)
            with open(serve_log, "w") as out:
                proc = subprocess.Popen([str(venv / "bin" / "mlflow"), "models", "serve", "-m",
                                         f"models:/{ts.NAME}@champion", "--env-manager", "local", "-p", str(port),
                                         "-h", "127.0.0.1"], cwd=empty, env=clean_env(venv, state["uri"]),
                                        stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            wait_until_up(proc, port, serve_log)
            state["port"] = port
            return f"port {port}, log {serve_log}"

        @step("POST a caption")
        def _():
            status, body = ts._post(state["port"], ts._split("text", [ts.CAPTION]))
            if status != 200:
                raise StepFailed(f"HTTP {status}: {body}")
            served = np.asarray(body["predictions"], np.float32)
            want = ts._reference(state["folder"], state["store"], "text", [ts.CAPTION])
            np.testing.assert_allclose(served, want, rtol=1e-5, atol=1e-6)
            return f"200, {served.shape}, max |diff| to checkpoint {np.abs(served - want).max():.1e}"

        @step("POST a base64 PNG (+ data: URL)")
        def _():
            png = ts._png(state["tmp"])
            b64 = base64.b64encode(png).decode()
            status, body = ts._post(state["port"], ts._split("image", [b64, "data:image/png;base64," + b64]))
            if status != 200:
                raise StepFailed(f"HTTP {status}: {body}")
            served = np.asarray(body["predictions"], np.float32)
            want = np.repeat(ts._reference(state["folder"], state["store"], "image", [png]), 2, axis=0)
            np.testing.assert_allclose(served, want, rtol=1e-5, atol=1e-6)
            return f"200, {served.shape}, max |diff| to checkpoint {np.abs(served - want).max():.1e}"

        @step("bad requests get a one-line 400")
        def _():
            cases = [({"dataframe_split": {"columns": ["caption"], "data": [[ts.CAPTION]]}},
                      "input needs exactly one of the columns"),
                     (ts._split("image", [base64.b64encode(b"not an image").decode()]),
                      "image row 0: cannot decode the image")]
            lines = []
            for payload, message in cases:
                status, body = ts._post(state["port"], payload)
                last = body.get("message", "").splitlines()[-1] if body.get("message") else ""
                if status != 400 or body.get("error_code") != "INVALID_PARAMETER_VALUE" or message not in last \
                        or "Traceback" in body.get("message", "") or "stack_trace" in body:
                    raise StepFailed(f"HTTP {status}: {body}")
                lines.append(last[last.find(message):])
            return "400: " + " | ".join(lines)
    except StepFailed:
        failed = True
    finally:
        if proc is not None:
            start = time.monotonic()
            ts._stop(proc)
            ROWS.append(("stop the server", time.monotonic() - start, f"ok: exit {proc.returncode}"))

    width = max(len(r[0]) for r in ROWS)
    print(f"\n{'step':<{width}}  {'seconds':>8}  result")
    for name, seconds, result in ROWS:
        print(f"{name:<{width}}  {seconds:8.1f}  {result}")
    print(f"\ntotal {sum(r[1] for r in ROWS):.1f} s; {'FAILED' if failed else 'all steps passed'}")
    if args.keep or failed:
        print(f"kept {work} (pip.log, serve.log, venv)")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
