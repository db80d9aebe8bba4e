"""The peers' side of `cargo xtask bench`: the same work as ablate's rows, run
with Ray Tune, Optuna, MLflow and PyTorch from the venv xtask provisions.
Each command prints one JSON object on stdout; timings are wall-clock seconds
of the work alone (library imports, worker processes and cluster start-up
excluded, as ablate's daemon is up before its rows are timed). A run that
finished fewer trials than asked exits 1 with the counts: an error, not a row.

  peers.py sweep --tool {ray,optuna} --trials N --seconds S --slots K [--pg URL]
  peers.py optuna-lifecycles --pg URL --trials N
  peers.py mlflow-ingest --pg URL --points N
  peers.py torch-step --model {mlp,gpt} --threads T --steps N [--width W --batch B]
  peers.py search --trials N --startup K --seeds S
"""

import argparse
import json
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time


def emit(**fields):
    json.dump(fields, sys.stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()


def sleep_objective(seconds):
    def objective(trial):
        trial.suggest_int("seed", 0, 1_000_000)
        time.sleep(seconds)
        return 1.0

    return objective


def optuna_worker(url, name, trials, seconds, ready, go):
    """One Optuna worker process: imports, engine and study loaded before the clock starts."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=url)
    study.trials  # the engine's first connection and query, as a warm worker has them
    ready.wait()
    go.wait()
    study.optimize(sleep_objective(seconds), n_trials=trials)


def finished_all(tool, done, asked):
    """A peer run that finished fewer trials than asked is an error, not a figure."""
    if done != asked:
        sys.stderr.write(f"{tool} finished {done} of the {asked} trials asked\n")
        sys.exit(1)


def sweep_optuna(a):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = f"bench-{os.getpid()}-{a.trials}"
    optuna.create_study(study_name=name, storage=a.pg)
    per = [a.trials // a.slots + (1 if i < a.trials % a.slots else 0) for i in range(a.slots)]
    ctx = multiprocessing.get_context("spawn")
    # The worker processes start, import optuna and load the study before the clock
    # starts, as ablate's daemon is running before its sweep is timed.
    ready, go = ctx.Barrier(a.slots + 1), ctx.Event()
    workers = [ctx.Process(target=optuna_worker, args=(a.pg, name, n, a.seconds, ready, go)) for n in per]
    for w in workers:
        w.start()
    ready.wait()
    start = time.perf_counter()
    go.set()
    for w in workers:
        w.join()
    wall = time.perf_counter() - start
    if any(w.exitcode != 0 for w in workers):
        sys.stderr.write(f"an optuna worker exited with {[w.exitcode for w in workers]}\n")
        sys.exit(1)
    study = optuna.load_study(study_name=name, storage=a.pg)
    done = sum(1 for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    finished_all("optuna", done, a.trials)
    emit(tool="optuna", version=optuna.__version__, trials=done, wall=wall, timed="worker processes started and studies loaded before the clock")


def sweep_ray(a):
    import ray
    from ray import tune

    ray.init(num_cpus=a.slots, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    seconds = a.seconds

    def trainable(config):
        time.sleep(seconds)
        tune.report({"loss": 1.0 / (1 + config["seed"])})

    storage = tempfile.mkdtemp(prefix="ablate-bench-ray-")
    tuner = tune.Tuner(
        trainable,
        param_space={"seed": tune.grid_search(list(range(a.trials)))},
        tune_config=tune.TuneConfig(max_concurrent_trials=a.slots, reuse_actors=True),
        run_config=tune.RunConfig(storage_path=storage, verbose=0),
    )
    start = time.perf_counter()
    results = tuner.fit()
    wall = time.perf_counter() - start
    ok = sum(1 for r in results if r.error is None)
    ray.shutdown()
    finished_all("ray", ok, a.trials)
    emit(tool="ray", version=ray.__version__, trials=ok, wall=wall)


def optuna_lifecycles(a):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=f"lifecycles-{os.getpid()}", storage=a.pg)
    start = time.perf_counter()
    for _ in range(a.trials):
        trial = study.ask()
        study.tell(trial, 1.0)
    wall = time.perf_counter() - start
    emit(tool="optuna", trials=a.trials, wall=wall, rate=a.trials / wall)


def mlflow_ingest(a):
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=a.pg)
    experiment = client.create_experiment(f"ingest-{os.getpid()}")
    run = client.create_run(experiment)
    batch = 1000  # the most one log_batch call takes
    now = int(time.time() * 1000)
    start = time.perf_counter()
    sent = 0
    while sent < a.points:
        metrics = [
            Metric("train_loss" if (sent + i) % 2 == 0 else "grad_norm", 1.0 / (1 + sent + i), now, (sent + i) // 2)
            for i in range(batch)
        ]
        client.log_batch(run.info.run_id, metrics=metrics)
        sent += batch
    wall = time.perf_counter() - start
    emit(tool="mlflow", points=sent, wall=wall, rate=sent / wall)


def torch_step(a):
    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.model == "mlp":
        # The quickstart MLP: 64 inputs (8x8 digits), depth 2, 10 classes; Adam.
        w = a.width
        model = torch.nn.Sequential(
            torch.nn.Linear(64, w), torch.nn.ReLU(),
            torch.nn.Linear(w, w), torch.nn.ReLU(),
            torch.nn.Linear(w, 10),
        )
        x = torch.rand(a.batch, 64)
        y = torch.randint(0, 10, (a.batch,))

        def loss_fn():
            return torch.nn.functional.cross_entropy(model(x), y)
    else:
        # A small character GPT as ablate's (experiments/src/nn/transformer.rs): 2 layers,
        # width 128, 4 heads, context 64, batch 32; linear maps without biases, a ReLU MLP.
        width, heads, context, vocab, layers = 128, 4, 64, 256, 2

        class Block(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.ln1 = torch.nn.LayerNorm(width)
                self.qkv = torch.nn.Linear(width, 3 * width, bias=False)
                self.proj = torch.nn.Linear(width, width, bias=False)
                self.ln2 = torch.nn.LayerNorm(width)
                self.fc = torch.nn.Linear(width, 4 * width, bias=False)
                self.out = torch.nn.Linear(4 * width, width, bias=False)

            def forward(self, h):
                b, t, _ = h.shape
                q, k, v = self.qkv(self.ln1(h)).split(width, dim=2)
                q, k, v = (z.view(b, t, heads, width // heads).transpose(1, 2) for z in (q, k, v))
                att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
                h = h + self.proj(att.transpose(1, 2).reshape(b, t, width))
                return h + self.out(torch.relu(self.fc(self.ln2(h))))

        class Gpt(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.tok = torch.nn.Embedding(vocab, width)
                self.pos = torch.nn.Embedding(context, width)
                self.blocks = torch.nn.ModuleList(Block() for _ in range(layers))
                self.ln = torch.nn.LayerNorm(width)
                self.head = torch.nn.Linear(width, vocab, bias=False)

            def forward(self, idx):
                h = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
                for block in self.blocks:
                    h = block(h)
                return self.head(self.ln(h))

        model = Gpt()
        x = torch.randint(0, vocab, (32, context))
        y = torch.randint(0, vocab, (32, context))

        def loss_fn():
            return torch.nn.functional.cross_entropy(model(x).view(-1, vocab), y.view(-1))

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        return loss

    for _ in range(max(5, a.steps // 10)):
        step()
    start = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    loss.item()
    wall = time.perf_counter() - start
    emit(tool="pytorch", version=torch.__version__, steps=a.steps, wall=wall, rate=a.steps / wall)


def synthetic_loss(p):
    """The synthetic task of ablate's search rows (ablate_experiments::tpe::synthetic), the same formula."""
    act = {"gelu": 0.0, "silu": 0.1}.get(p["activation"], 0.4)
    return (
        (math.log10(p["lr"]) + 2.5) ** 2
        + ((p["log2_batch"] - 6.0) / 3.0) ** 2
        + act
        + 2.0 * (p["x"] - 0.3) ** 2
    )


def search(a):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def objective(trial):
        return synthetic_loss(
            {
                "activation": trial.suggest_categorical("activation", ["relu", "gelu", "tanh", "silu"]),
                "log2_batch": trial.suggest_int("log2_batch", 2, 10),
                "lr": trial.suggest_float("lr", 1e-5, 1.0, log=True),
                "x": trial.suggest_float("x", 0.0, 1.0),
            }
        )

    best = {"tpe": [], "random": []}
    for seed in range(a.seeds):
        for name, sampler in [
            ("tpe", optuna.samplers.TPESampler(seed=seed, n_startup_trials=a.startup)),
            ("random", optuna.samplers.RandomSampler(seed=seed)),
        ]:
            study = optuna.create_study(sampler=sampler)
            study.optimize(objective, n_trials=a.trials)
            best[name].append(study.best_value)
    emit(tool="optuna", version=optuna.__version__, tpe=statistics.median(best["tpe"]),
         random=statistics.median(best["random"]), tpe_bests=best["tpe"], random_bests=best["random"])


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sweep")
    s.add_argument("--tool", choices=["ray", "optuna"], required=True)
    s.add_argument("--trials", type=int, required=True)
    s.add_argument("--seconds", type=float, required=True)
    s.add_argument("--slots", type=int, default=2)
    s.add_argument("--pg")
    l = sub.add_parser("optuna-lifecycles")
    l.add_argument("--pg", required=True)
    l.add_argument("--trials", type=int, required=True)
    m = sub.add_parser("mlflow-ingest")
    m.add_argument("--pg", required=True)
    m.add_argument("--points", type=int, required=True)
    t = sub.add_parser("torch-step")
    t.add_argument("--model", choices=["mlp", "gpt"], required=True)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--steps", type=int, default=500)
    t.add_argument("--width", type=int, default=256)
    t.add_argument("--batch", type=int, default=128)
    r = sub.add_parser("search")
    r.add_argument("--trials", type=int, default=60)
    r.add_argument("--startup", type=int, default=10)
    r.add_argument("--seeds", type=int, default=10)
    a = p.parse_args()
    if a.command == "search":
        search(a)
    elif a.command == "sweep":
        (sweep_ray if a.tool == "ray" else sweep_optuna)(a)
    elif a.command == "optuna-lifecycles":
        optuna_lifecycles(a)
    elif a.command == "mlflow-ingest":
        mlflow_ingest(a)
    else:
        torch_step(a)


if __name__ == "__main__":
    main()
