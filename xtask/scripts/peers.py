"""The peers' side of `cargo xtask bench`: the same work as ablate's rows, run
with Ray Tune, Optuna, MLflow and PyTorch from the venv xtask provisions.
Each command prints one JSON object on stdout; timings are wall-clock seconds
of the work alone (library imports, worker processes and cluster start-up
excluded, as ablate's daemon is up before its rows are timed). A run that
finished fewer trials than asked exits 1 with the counts: an error, not a row.

  peers.py sweep --tool {ray,optuna} --trials N --seconds S --slots K [--pg URL]
  peers.py optuna-lifecycles --pg URL --trials N
  peers.py mlflow-ingest --pg URL --points N
  peers.py mlflow-scale --pg URL --trials N --steps S --wide W
  peers.py torch-step --model {mlp,gpt} --threads T --steps N [--width W --batch B]
  peers.py search --trials N --startup K --seeds S
  peers.py search-parallel --pg URL --trials N --startup K --seeds S --jobs J
  peers.py search-pareto --trials N --startup K --seeds S
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


WIDTHS = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]

# The value of metric k at a step, as ablate-bench's scale rows stream it.
SCALE_VALUE = """(0.1 + abs(r.lr + 9 + 0.3 * r.wi) / 5) * (1 + 0.1 * k) * (1 + 2 * exp(-s / 2000.0))
                 + 0.005 * sin(0.37 * s + 7 * r.seed + k)"""


def mlflow_scale(a):
    """MLflow given the runs and points of ablate-bench's scale rows: the
    width x learning rate x seed grid as runs with their params, every point
    in its metrics table (loaded by SQL, its indexes built after, since
    log_batch would take hours; log_batch's own rate is measured on a
    sample), then the same reads through its client and its CLI."""
    import subprocess

    import psycopg2
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=a.pg)
    dsn = a.pg.replace("postgresql+psycopg2://", "postgresql://")
    db = psycopg2.connect(dsn)
    db.autocommit = True
    cur = db.cursor()
    out = {}

    sample_exp = client.create_experiment("log-batch-sample")
    run = client.create_run(sample_exp)
    now = int(time.time() * 1000)
    start = time.perf_counter()
    for b in range(20):
        client.log_batch(run.info.run_id, metrics=[
            Metric(f"m{i % 10}", 1.0 / (1 + i), now, b * 100 + i // 10) for i in range(1000)])
    out["log_batch_rate"] = 20_000 / (time.perf_counter() - start)

    def grid(name, trials, steps):
        exp = client.create_experiment(name)
        template = client.create_run(exp).info.run_id
        seeds = max(1, trials // 100)
        cur.execute("create temp table if not exists scale_runs (run_uuid text, exp int, wi int, lr int, seed int)")
        cur.execute(
            """insert into scale_runs
               select md5(%s || '-' || w || '-' || l || '-' || sd), %s, w, l, sd
               from generate_series(0, 9) w, generate_series(-14, -5) l, generate_series(0, %s) sd""",
            (name, int(exp), seeds - 1))
        cur.execute(
            """insert into runs (run_uuid, name, source_type, source_name, entry_point_name, user_id, status,
                                 start_time, end_time, source_version, lifecycle_stage, artifact_uri, experiment_id)
               select s.run_uuid, 'run-' || s.wi || '-' || s.lr || '-' || s.seed, t.source_type, t.source_name,
                      t.entry_point_name, t.user_id, 'FINISHED', t.start_time, t.start_time + 1000,
                      t.source_version, 'active', t.artifact_uri, t.experiment_id
               from scale_runs s, runs t where t.run_uuid = %s and s.exp = %s""",
            (template, int(exp)))
        client.delete_run(template)
        cur.execute(
            """insert into params (key, value, run_uuid)
               select p.key, p.value, s.run_uuid from scale_runs s cross join lateral (values
                   ('width', (array%s)[s.wi + 1]::text), ('log2_lr', s.lr::text), ('seed', s.seed::text)) p(key, value)
               where s.exp = %s""" % (WIDTHS, int(exp)))
        return exp

    def load(exp, steps, metrics):
        cur.execute(
            f"""insert into metrics (key, value, timestamp, run_uuid, step, is_nan)
                select 'm' || k, {SCALE_VALUE}, 1796000000000 + s, r.run_uuid, s, false
                from scale_runs r, generate_series(0, %s - 1) k, generate_series(0, %s - 1) s
                where r.exp = %s""",
            (metrics, steps, int(exp)))
        cur.execute(
            f"""insert into latest_metrics (key, value, timestamp, step, is_nan, run_uuid)
                select 'm' || k, {SCALE_VALUE}, 1796000000000 + s, s, false, r.run_uuid
                from scale_runs r, generate_series(0, %s - 1) k, (select %s - 1 as s) last
                where r.exp = %s""",
            (metrics, steps, int(exp)))

    # Bulk load: MLflow's indexes and keys on metrics dropped, then built again as it made them.
    cur.execute("select indexdef from pg_indexes where tablename = 'metrics' and indexname <> 'metric_pk'")
    indexes = [r[0] for r in cur.fetchall()]
    start = time.perf_counter()
    cur.execute("alter table metrics drop constraint metric_pk")
    for d in indexes:
        cur.execute("drop index " + d.split(" INDEX ")[1].split(" ON ")[0])
    big = grid("scale", a.trials, a.steps)
    load(big, a.steps, 10)
    wide = grid("scale-wide", a.wide, 10)
    load(wide, 10, 2)
    cur.execute("alter table metrics add constraint metric_pk primary key (key, timestamp, step, run_uuid, value, is_nan)")
    for d in indexes:
        cur.execute(d)
    cur.execute("analyze")
    out["load_s"] = time.perf_counter() - start
    cur.execute("select (pg_total_relation_size('metrics') + pg_total_relation_size('latest_metrics'))::float8"
                " / (select count(*) from metrics)")
    out["bytes_per_point"] = cur.fetchone()[0]

    def median3(f):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            f()
            times.append((time.perf_counter() - start) * 1000)
        return sorted(times)[1]

    def every_run(exp):
        runs, token = [], None
        while True:
            page = client.search_runs([exp], max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    assert len(every_run(wide)) == a.wide, "every run of the wide experiment listed"
    out["search_wide_ms"] = median3(lambda: every_run(wide))
    big_runs = every_run(big)
    hundred = [r.info.run_id for r in big_runs[:100]]
    out["history_100_ms"] = median3(lambda: [client.get_metric_history(r, "m0") for r in hundred])
    env = dict(os.environ, MLFLOW_TRACKING_URI=a.pg)
    mlflow_cli = os.path.join(os.path.dirname(sys.executable), "mlflow")
    out["runs_list_ms"] = median3(lambda: subprocess.run(
        [mlflow_cli, "runs", "list", "--experiment-id", str(wide)], env=env, check=True, capture_output=True))

    def best_api():
        best = {}
        for r in big_runs:
            width = int(r.data.params["width"])
            low = min(m.value for m in client.get_metric_history(r.info.run_id, "m0"))
            best[width] = min(best.get(width, low), low)
        return best

    start = time.perf_counter()
    best_api()
    out["best_api_ms"] = (time.perf_counter() - start) * 1000

    def best_sql():
        cur.execute(
            """select p.value::int, min(m.value) from metrics m
               join runs r on r.run_uuid = m.run_uuid and r.experiment_id = %s
               join params p on p.run_uuid = m.run_uuid and p.key = 'width'
               where m.key = 'm0' group by 1 order by 1""", (int(big),))
        return cur.fetchall()

    out["best_sql_ms"] = median3(best_sql)
    emit(tool="mlflow", **out)


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


def zdt1(x):
    """ZDT1 on four parameters, as ablate_experiments::pareto::zdt1: both to minimize."""
    g = 1.0 + 3.0 * (x[1] + x[2] + x[3])
    return x[0], g * (1.0 - math.sqrt(x[0] / g))


def hypervolume_2d(points, reference):
    """The area the points (to minimize) dominate up to `reference`, as ablate's hypervolume_2d."""
    inside = sorted(p for p in points if p[0] < reference[0] and p[1] < reference[1])
    area, ceiling = 0.0, reference[1]
    for x, y in inside:
        if y < ceiling:
            area += (reference[0] - x) * (ceiling - y)
            ceiling = y
    return area


def search_pareto(a):
    """Optuna's multi-objective TPE (TPESampler on a study of two directions) on ZDT1:
    the hypervolume of all its trials after the budget, per seed."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def objective(trial):
        return zdt1([trial.suggest_float(f"x{i}", 0.0, 1.0) for i in range(1, 5)])

    volumes = []
    for seed in range(a.seeds):
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=a.startup)
        study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
        study.optimize(objective, n_trials=a.trials)
        volumes.append(hypervolume_2d([tuple(t.values) for t in study.trials], (1.1, 1.1)))
    emit(tool="optuna", version=optuna.__version__, hypervolume=statistics.median(volumes), volumes=volumes)


def search_parallel(a):
    """Optuna's TPE as its docs advise for a busy cluster: multivariate, constant liar,
    `n_jobs` trials at once through its RDB storage (PostgreSQL). Each trial sleeps a
    seeded 0.5 to 1.5 s before it answers (the spread of ablate's simulated trials), so
    trials overlap and finish out of order, and each takes longer than a proposal:
    shorter trials leave Optuna's threads waiting on its storage, fewer in flight."""
    import random
    import threading

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(a.pg)
    bests, fewest = [], []
    for seed in range(a.seeds):
        delays = random.Random(seed)
        lock = threading.Lock()
        state = {"running": 0, "started": 0, "fewest": None}

        def objective(trial):
            p = {
                "activation": trial.suggest_categorical("activation", ["relu", "gelu", "tanh", "silu"]),
                "log2_batch": trial.suggest_int("log2_batch", 2, 10),
                "lr": trial.suggest_float("lr", 1e-5, 1.0, log=True),
                "x": trial.suggest_float("x", 0.0, 1.0),
            }
            with lock:
                state["running"] += 1
                state["started"] += 1
                delay = 0.5 + delays.random()
            time.sleep(delay)
            with lock:
                # In flight while at least `jobs` trials were left to finish.
                if a.trials - (state["started"] - state["running"]) >= a.jobs:
                    f = state["fewest"]
                    state["fewest"] = state["running"] if f is None else min(f, state["running"])
                state["running"] -= 1
            return synthetic_loss(p)

        sampler = optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=a.startup, multivariate=True, constant_liar=True
        )
        study = optuna.create_study(storage=storage, sampler=sampler, study_name=f"search-{seed}-{time.time_ns()}")
        study.optimize(objective, n_trials=a.trials, n_jobs=a.jobs)
        bests.append(study.best_value)
        fewest.append(state["fewest"])
    emit(tool="optuna", version=optuna.__version__, tpe=statistics.median(bests), bests=bests, fewest_in_flight=fewest)


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
    sc = sub.add_parser("mlflow-scale")
    sc.add_argument("--pg", required=True)
    sc.add_argument("--trials", type=int, required=True)
    sc.add_argument("--steps", type=int, required=True)
    sc.add_argument("--wide", type=int, required=True)
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
    r = sub.add_parser("search-pareto")
    r.add_argument("--trials", type=int, default=60)
    r.add_argument("--startup", type=int, default=10)
    r.add_argument("--seeds", type=int, default=10)
    r = sub.add_parser("search-parallel")
    r.add_argument("--pg", required=True)
    r.add_argument("--trials", type=int, default=64)
    r.add_argument("--startup", type=int, default=10)
    r.add_argument("--seeds", type=int, default=10)
    r.add_argument("--jobs", type=int, default=8)
    a = p.parse_args()
    if a.command == "search":
        search(a)
    elif a.command == "search-pareto":
        search_pareto(a)
    elif a.command == "search-parallel":
        search_parallel(a)
    elif a.command == "sweep":
        (sweep_ray if a.tool == "ray" else sweep_optuna)(a)
    elif a.command == "optuna-lifecycles":
        optuna_lifecycles(a)
    elif a.command == "mlflow-ingest":
        mlflow_ingest(a)
    elif a.command == "mlflow-scale":
        mlflow_scale(a)
    else:
        torch_step(a)


if __name__ == "__main__":
    main()
