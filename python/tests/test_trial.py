"""The trial helpers write the event protocol the worker reads (README, "Command
trials"): each test runs a program in a child process with a pipe as its events
descriptor, as the worker does, and reads what came."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

PACKAGE = str(Path(__file__).resolve().parents[1])


def run_program(body, env=None, tmp_path=None):
    """Runs `body` (Python) with the events pipe on a descriptor named by ABLATE_EVENTS_FD."""
    read, write = os.pipe()
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("ABLATE_")}
    child_env.update({"PYTHONPATH": PACKAGE, "ABLATE_EVENTS_FD": str(write)})
    if tmp_path is not None:
        child_env["ABLATE_CHECKPOINT_DIR"] = str(tmp_path / "checkpoint")
    child_env.update(env or {})
    program = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(body)],
        env=child_env,
        pass_fds=(write,),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    os.close(write)
    with os.fdopen(read) as events:
        lines = [json.loads(line) for line in events]
    out, err = program.communicate(timeout=60)
    assert program.returncode == 0, err.decode()
    return lines, out.decode()


def test_events_come_in_order_with_nan_and_infinities_kept(tmp_path):
    lines, _ = run_program(
        """
        import ablate
        for step in range(1, 4):
            ablate.log(step, train_loss=1.0 / step, eval_loss=float("nan") if step == 2 else 0.5)
        (ablate.checkpoint_dir() / "state").write_text("3")
        ablate.checkpoint(3)
        ablate.log(4, up=float("inf"), down=float("-inf"))
        ablate.output(best={"step": 3, "loss": 0.33})
        """,
        tmp_path=tmp_path,
    )
    assert lines == [
        {"step": 1, "metrics": {"train_loss": 1.0, "eval_loss": 0.5}},
        {"step": 2, "metrics": {"train_loss": 0.5, "eval_loss": "nan"}},
        {"step": 3, "metrics": {"train_loss": 1.0 / 3, "eval_loss": 0.5}},
        {"checkpoint": 3},
        {"step": 4, "metrics": {"up": "inf", "down": "-inf"}},
        {"output": {"best": {"step": 3, "loss": 0.33}}},
    ]
    assert (tmp_path / "checkpoint" / "state").read_text() == "3"


def test_many_points_all_arrive_before_the_program_ends():
    lines, _ = run_program(
        """
        import ablate
        for step in range(20000):
            ablate.log(step, loss=step * 0.5)
        """
    )
    assert [line["step"] for line in lines] == list(range(20000))


def test_parameters_resume_and_rung_come_from_the_environment(tmp_path):
    params_file = tmp_path / "params.json"
    params_file.write_text(json.dumps({"width": 64}))
    _, out = run_program(
        """
        import ablate
        print(ablate.params(), ablate.resume_step(), ablate.pause_at(),
              ablate.should_pause(9), ablate.should_pause(10))
        """,
        env={"ABLATE_PARAMS": json.dumps({"lr": 0.1, "name": "a"}), "ABLATE_RESUME_STEP": "5", "ABLATE_PAUSE_AT": "10"},
    )
    assert out.strip() == "{'lr': 0.1, 'name': 'a'} 5 10 False True"
    _, out = run_program(
        "import ablate; print(ablate.params())",
        env={"ABLATE_PARAMS_FILE": str(params_file)},
    )
    assert out.strip() == "{'width': 64}"


def test_a_script_runs_by_hand_outside_ablate(tmp_path):
    body = """
        import ablate
        ablate.log(1, loss=0.5)
        ablate.checkpoint(1)
        print(ablate.params(), ablate.resume_step(), ablate.checkpoint_dir())
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("ABLATE_")}
    env["PYTHONPATH"] = PACKAGE
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(body)], env=env, cwd=tmp_path, capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().strip() == "{} None checkpoint"
    assert (tmp_path / "checkpoint").is_dir()


def test_log_without_metrics_says_what_to_write():
    done = subprocess.run(
        [sys.executable, "-c", "import ablate; ablate.log(1)"],
        env={"PYTHONPATH": PACKAGE, "PATH": os.environ.get("PATH", "")},
        capture_output=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "log(step, loss=0.5)" in done.stderr.decode()


def test_checkpoint_returns_once_the_worker_says_it_stored_the_step(tmp_path):
    ack = tmp_path / "checkpoint-stored"
    read, write = os.pipe()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ABLATE_")}
    env.update({
        "PYTHONPATH": PACKAGE,
        "ABLATE_EVENTS_FD": str(write),
        "ABLATE_CHECKPOINT_DIR": str(tmp_path / "checkpoint"),
        "ABLATE_CHECKPOINT_ACK": str(ack),
    })
    body = """
        import ablate
        ablate.checkpoint(7)
        print("returned")
    """
    program = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(body)], env=env, pass_fds=(write,), stdout=subprocess.PIPE
    )
    os.close(write)
    events = os.fdopen(read)
    assert json.loads(events.readline()) == {"checkpoint": 7}
    # Not before the worker's word: the program still waits.
    try:
        program.wait(timeout=0.5)
        raise AssertionError("checkpoint() returned before the step was stored")
    except subprocess.TimeoutExpired:
        pass
    ack.write_text("7\n")
    out, _ = program.communicate(timeout=30)
    assert out.decode().strip() == "returned"
    events.close()


def test_a_child_without_the_descriptor_reaches_the_pipe_by_path():
    """As under torchrun: the launcher's children do not inherit descriptor 3."""
    read, write = os.pipe()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ABLATE_")}
    env.update({
        "PYTHONPATH": PACKAGE,
        "ABLATE_EVENTS_FD": str(write),
        "ABLATE_EVENTS_PATH": f"/proc/{os.getpid()}/fd/{write}",
    })
    launcher = """
        import subprocess, sys
        child = "import ablate; ablate.log(1, loss=0.25)"
        sys.exit(subprocess.call([sys.executable, "-c", child]))
    """
    program = subprocess.Popen([sys.executable, "-c", textwrap.dedent(launcher)], env=env, pass_fds=(write,))
    assert program.wait(timeout=60) == 0
    os.close(write)
    with os.fdopen(read) as events:
        lines = [json.loads(line) for line in events]
    assert lines == [{"step": 1, "metrics": {"loss": 0.25}}]


def test_should_stop_sees_the_workers_stop_file(tmp_path):
    stop = tmp_path / "stop"
    _, out = run_program(
        """
        import ablate, pathlib, os
        before = ablate.should_stop()
        pathlib.Path(os.environ["ABLATE_STOP_FILE"]).write_text("stop")
        print(before, ablate.should_stop())
        """,
        env={"ABLATE_STOP_FILE": str(stop)},
    )
    assert out.strip() == "False True"
