"""A PyTorch MLP trained as an ablate command trial, in SP or in muP.

The model is 64-w-w-10 (input layer, one hidden layer, readout), trained with Adam
and a linearly decaying learning rate on a fixed synthetic task (Gaussian inputs
labelled by a random teacher network, the same for every trial). Parameters:
width, log2_lr, parametrization ("sp" or "mup"), seed, steps, batch_size, base_width.

muP follows microsoft/mup's output-multiplier form for Adam: the hidden layer's
learning rate is divided by width / base_width, the logits are divided by it, and
the readout starts at zero. At the base width muP and SP differ only in that zero
readout.

It checkpoints every `checkpoint_every` steps (model, optimizer and the data
order's generator state) and resumes from the newest checkpoint bit for bit, so a
run killed and resumed logs the same curve as an unbroken one.

Under `torchrun --nproc_per_node N` (ddp.toml) each of the N processes trains on
batches of its own, their gradients averaged every step; the first logs and
checkpoints for all.
"""

import math
import os

import torch
import torch.nn.functional as F

import ablate.trial as trial

p = trial.params()
width = int(p["width"])
base_width = int(p.get("base_width", 32))
lr = 2.0 ** float(p["log2_lr"])
mup = p.get("parametrization", "sp") == "mup"
steps = int(p.get("steps", 300))
batch = int(p.get("batch_size", 64))
seed = int(p.get("seed", 0))
every = int(p.get("checkpoint_every", 100))
delay = float(p.get("step_delay", 0.0))  # seconds per step, for tests that kill a run mid-way

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

# Data-parallel under torchrun: gloo on CPU, NCCL on the GPUs the worker granted.
world = int(os.environ.get("WORLD_SIZE", "1"))
rank = int(os.environ.get("RANK", "0"))
device = torch.device("cpu")
if world > 1:
    import torch.distributed as dist

    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
lead = rank == 0

# The task: the same for every trial.
task = torch.Generator().manual_seed(1234)
inputs = torch.randn(2048, 64, generator=task)
teacher = torch.randn(64, 64, generator=task) / 8.0
readout = torch.randn(64, 10, generator=task)
labels = (torch.tanh(inputs @ teacher) @ readout).argmax(dim=1)
inputs, labels = inputs.to(device), labels.to(device)

# The model, its own init from the seed.
torch.manual_seed(seed)
first = torch.nn.Linear(64, width)
hidden = torch.nn.Linear(width, width)
last = torch.nn.Linear(width, 10)
first, hidden, last = first.to(device), hidden.to(device), last.to(device)
m = width / base_width
if mup:
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
out_mult = 1.0 / m if mup else 1.0
groups = [
    {"params": list(first.parameters()), "lr": lr},
    {"params": [hidden.weight], "lr": lr / m if mup else lr},
    {"params": [hidden.bias], "lr": lr},
    {"params": list(last.parameters()), "lr": lr},
]
for g in groups:
    g["base_lr"] = g["lr"]
opt = torch.optim.Adam(groups)


def forward(x):
    h = F.relu(first(x))
    h = F.relu(hidden(h))
    return last(h) * out_mult


modules = {"first": first, "hidden": hidden, "last": last}
order = torch.Generator().manual_seed(seed + 1 + rank)
start = 0
resumed = trial.resume_step()
if resumed is not None:
    state = torch.load(trial.checkpoint_dir() / "state.pt", map_location=device)
    for name, module in modules.items():
        module.load_state_dict(state[name])
    opt.load_state_dict(state["opt"])
    order.set_state(torch.load(trial.checkpoint_dir() / f"order-{rank}.pt"))
    start = resumed

rung = trial.pause_at()
for step in range(start + 1, steps + 1):
    frac = (step - 1) / steps
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * (1.0 - frac)
    idx = torch.randint(0, inputs.shape[0], (batch,), generator=order)
    loss = F.cross_entropy(forward(inputs[idx]), labels[idx])
    opt.zero_grad()
    loss.backward()
    if world > 1:
        for g in opt.param_groups:
            for param in g["params"]:
                dist.all_reduce(param.grad)
                param.grad /= world
    opt.step()
    if lead:
        trial.log(step, train_loss=loss.item())
    if delay:
        import time

        time.sleep(delay)
    if step % every == 0 or step == rung:
        torch.save(order.get_state(), trial.checkpoint_dir() / f"order-{rank}.pt")
        if world > 1:
            dist.barrier()
        if lead:
            state = {name: mod.state_dict() for name, mod in modules.items()}
            state["opt"] = opt.state_dict()
            torch.save(state, trial.checkpoint_dir() / "state.pt")
            trial.checkpoint(step)
        if world > 1:
            dist.barrier()
    if step == rung and step < steps:
        if lead:
            trial.pause(step)
        raise SystemExit(0)

with torch.no_grad():
    final = F.cross_entropy(forward(inputs), labels).item()
if not math.isfinite(final):
    final = float("inf")
if lead:
    trial.log(steps, train_loss_final=final)
    trial.output(train_loss_final=final)
if world > 1:
    dist.destroy_process_group()
