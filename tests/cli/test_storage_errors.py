"""Every storage failure a user can meet through `deim-ray resolve/fetch/ls` (malformed URI, missing bucket or
run, wrong secret, unknown key, no credentials, unreachable endpoint) ends as exactly one stderr line
`deim-ray: error: ...` with exit status 2, names what to fix, and never prints a secret.

Every case runs against the real SeaweedFS server (no Ray) through the real entry point `deim_ray.cli.main.main`,
in this process with the case's environment in place (each command opens its own S3 session, which reads the
environment then) and its stdout/stderr captured. The cases in IN_A_PROCESS also run as their own
`python -m deim_ray` process (started first, so they overlap the rest): the console script's exit status and a
fresh interpreter's credential lookup."""

import contextlib
import io
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from deim_ray.cli.main import main
from tests.fixtures_s3 import SECRET_KEY, _free_ports, temporary_bucket

ROOT = Path(__file__).resolve().parents[2]
WRONG_SECRET = "wrong-secret-Vb7Kq2Lm"
MISSING_BUCKET = "no-such-bucket-7316"


@dataclass(frozen=True)
class Case:
    argv: tuple[str, ...]
    """Arguments after `deim-ray`; `{bucket}` is the test bucket, `{out}` a fresh output directory."""
    words: tuple[str, ...]
    """Texts the one error line must contain."""
    env: dict = field(default_factory=dict)
    """Variables to set (None: unset) on top of the fixture's AWS environment."""
    rc: int = 2


def _commands(root: str) -> dict[str, tuple[str, ...]]:
    run = f"{root}/person-n"
    return {"resolve": ("resolve", run), "fetch": ("fetch", run, "-o", "{out}"), "ls": ("ls", root)}


_NO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None,
                   "AWS_SHARED_CREDENTIALS_FILE": "{empty}", "AWS_CONFIG_FILE": "{empty}"}
_FAULTS = {  # name -> (bucket, environment, words)
    "missing-bucket": (MISSING_BUCKET, {}, (MISSING_BUCKET, "does not exist", "create it")),
    "wrong-secret": ("{bucket}", {"AWS_SECRET_ACCESS_KEY": WRONG_SECRET},
                     ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")),
    "unknown-access-key": ("{bucket}", {"AWS_ACCESS_KEY_ID": "no-such-access-key"},
                           ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")),
    "no-credentials": ("{bucket}", _NO_CREDENTIALS, ("no S3 credentials found", "AWS_ACCESS_KEY_ID")),
    "unreachable": ("{bucket}", {"AWS_ENDPOINT_URL_S3": "{dead_endpoint}"},
                    ("cannot reach S3 endpoint", "{dead_endpoint}", "AWS_ENDPOINT_URL_S3")),
    "secret-in-endpoint-url": ("{bucket}", {"AWS_ENDPOINT_URL_S3": "http://user:" + SECRET_KEY + "@{dead_host}"},
                               ("cannot reach S3 endpoint", "{dead_endpoint}")),
}

_ONE_COMMAND = {"unknown-access-key": "resolve", "secret-in-endpoint-url": "ls"}
"""Faults whose handling does not depend on the command are run through one command only."""

CASES: dict[str, Case] = {
    f"{fault}-{command}": Case(argv, words, env)
    for fault, (bucket, env, words) in _FAULTS.items()
    for command, argv in _commands(f"s3://{bucket}/runs").items()
    if _ONE_COMMAND.get(fault, command) == command
}
CASES |= {
    "missing-run-resolve": Case(_commands("s3://{bucket}/runs")["resolve"],
                                ("no run at", "s3://{bucket}/runs/person-n", "deim-ray ls")),
    "missing-run-fetch": Case(_commands("s3://{bucket}/runs")["fetch"], ("no run at", "s3://{bucket}/runs/person-n")),
    "uri-without-bucket": Case(("resolve", "s3://"), ("has no bucket name", "s3://BUCKET")),
    "uri-names-a-bucket": Case(("resolve", "s3://{bucket}"), ("names a bucket, not a run directory",)),
    "uri-bad-bucket-name": Case(("fetch", "s3://Bad_Bucket/runs/person-n", "-o", "{out}"),
                                ("'Bad_Bucket'", "3-63 lowercase characters")),
    "uri-short-bucket": Case(("ls", "s3://ab"), ("3-63 lowercase characters",)),
    "uri-with-port": Case(("ls", "s3://{bucket}:9000/runs"), ("port", "AWS_ENDPOINT_URL_S3")),
    "uri-with-query": Case(("ls", "s3://{bucket}/runs?region=eu-west-1"), ("query",)),
    "uri-escapes-prefix": Case(("resolve", "s3://{bucket}/runs/../person-n"), ("not a plain relative key",)),
    "uri-unsupported-scheme": Case(("ls", "gs://{bucket}/runs"), ("unsupported scheme 'gs://'",)),
    "ls-of-empty-prefix": Case(("ls", "s3://{bucket}/runs"), ("no runs under s3://{bucket}/runs",), rc=0),
}


IN_A_PROCESS = ("no-credentials-ls", "secret-in-endpoint-url-ls", "missing-run-fetch")
"""Cases that run as their own process too: the environment holds no credentials at all, a secret is in the
endpoint, a failed fetch writes nothing; both runs of a case must give the same result."""


def _fill(text: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        text = text.replace("{" + name + "}", value)
    return text


def _environment(case: Case, values: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    for name, value in case.env.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = _fill(value, values)
    return env


@pytest.fixture(scope="module")
def bucket(s3_endpoint):
    with temporary_bucket(s3_endpoint, "t-cli") as name:
        yield name


@contextlib.contextmanager
def _environment_of(env: dict[str, str]):
    """The process environment is exactly `env` inside, and what it was again afterwards."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def _own_log_handler():
    """main() adds its log handler on the stderr of a call that finds none: one per case, as in a process."""
    logger = logging.getLogger("deim_ray")
    ours = [h for h in logger.handlers if getattr(h, "_deim_ray", False)]
    for handler in ours:
        logger.removeHandler(handler)
    try:
        yield
    finally:
        for handler in [h for h in logger.handlers if getattr(h, "_deim_ray", False)]:
            logger.removeHandler(handler)
        for handler in ours:
            logger.addHandler(handler)


def _in_process(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """`deim-ray argv` through `main()` in the environment `env`, its output captured as a process's would be."""
    out, err = io.StringIO(), io.StringIO()
    with _environment_of(env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), _own_log_handler():
        rc = main(argv)
    return subprocess.CompletedProcess(["deim-ray", *argv], rc, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def outcomes(bucket, tmp_path_factory):
    """Run every case in process, and the IN_A_PROCESS ones also as processes meanwhile: name -> (values, result);
    a process's result is under `name + " (process)"`."""
    tmp = tmp_path_factory.mktemp("cli-errors")
    (tmp / "empty").write_text("")
    dead_host = f"127.0.0.1:{_free_ports(1)[0]}"
    cases, running, results = {}, {}, {}
    for name, case in CASES.items():
        for how in ("",) + ((" (process)",) if name in IN_A_PROCESS else ()):
            values = {"bucket": bucket, "out": str(tmp / f"{name}{how}" / "out"), "empty": str(tmp / "empty"),
                      "dead_host": dead_host, "dead_endpoint": f"http://{dead_host}"}
            cases[name + how] = (values, [_fill(a, values) for a in case.argv], _environment(case, values))
    for name, (values, argv, env) in cases.items():
        if name.endswith(" (process)"):
            running[name] = subprocess.Popen([sys.executable, "-m", "deim_ray", *argv], env=env, cwd=ROOT,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for name, (values, argv, env) in cases.items():
        if name not in running:
            results[name] = (values, _in_process(argv, env))
    for name, proc in running.items():
        stdout, stderr = proc.communicate(timeout=240)
        results[name] = (cases[name][0], subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return results


@pytest.mark.parametrize("name", sorted(CASES) + [f"{n} (process)" for n in IN_A_PROCESS])
def test_storage_error_is_one_line_exit_2_without_secret(outcomes, name):
    case = CASES[name.removesuffix(" (process)")]
    values, proc = outcomes[name]
    output = proc.stdout + proc.stderr
    assert SECRET_KEY not in output and WRONG_SECRET not in output
    assert proc.returncode == case.rc, output
    line = (proc.stderr if case.rc else proc.stdout).strip()
    assert len(line.splitlines()) == 1, output
    if case.rc:
        assert proc.stdout == "" and line.startswith("deim-ray: error: "), output
    for text in case.words:
        assert _fill(text, values) in line, line
    out = Path(values["out"])
    assert not out.exists() or not any(out.iterdir())  # a failed fetch leaves nothing behind
