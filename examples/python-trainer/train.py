"""A trainer in pure Python that uses the ablate package's trial helpers
(python/ablate): least-squares regression by minibatch SGD on a fixed synthetic
data set, its parameters from ablate, a checkpoint every `checkpoint_every`
steps, a resume from the newest one, a stop at its rung. Run by hand it trains
with its defaults; as a trial, with the sweep's parameters."""

import json
import random

import ablate

p = {"lr": 0.05, "steps": 200, "batch_size": 8, "seed": 0, "checkpoint_every": 50, **ablate.params()}
data = random.Random(1234)
truth = [data.uniform(-1, 1) for _ in range(8)]
xs = [[data.gauss(0, 1) for _ in truth] for _ in range(512)]
ys = [sum(w * x for w, x in zip(truth, row)) + data.gauss(0, 0.1) for row in xs]

state_file = ablate.checkpoint_dir() / "state.json"
step, weights = 0, [0.0] * len(truth)
if ablate.resume_step() is not None:
    saved = json.loads(state_file.read_text())
    step, weights = saved["step"], saved["weights"]

rng = random.Random(p["seed"])
for _ in range(step):  # the data order of the steps already taken
    rng.sample(range(len(xs)), p["batch_size"])


def loss(rows):
    return sum((sum(w * x for w, x in zip(weights, xs[i])) - ys[i]) ** 2 for i in rows) / len(rows)


while step < p["steps"]:
    batch = rng.sample(range(len(xs)), p["batch_size"])
    grad = [0.0] * len(weights)
    for i in batch:
        err = sum(w * x for w, x in zip(weights, xs[i])) - ys[i]
        for j, x in enumerate(xs[i]):
            grad[j] += 2 * err * x / len(batch)
    weights = [w - p["lr"] * g for w, g in zip(weights, grad)]
    step += 1
    ablate.log(step, train_loss=loss(batch), eval_loss=loss(range(len(xs))))
    rung = ablate.should_pause(step)
    if step % p["checkpoint_every"] == 0 or rung:
        state_file.write_text(json.dumps({"step": step, "weights": weights}))
        ablate.checkpoint(step)
    if rung:
        ablate.pause(step)
        raise SystemExit(0)

ablate.output(weights=weights)
