"""The trainer: learning, distillation, AMP, param groups, hooks, logs, recipe plumbing."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset

from pyengine.train.data import EpochSampler, digits
from pyengine.train.trainer import (DIGITS_RECIPE, default_param_groups, evaluate, fit, kd_loss,
                            lr_factor, make_optimizer, seed_everything, train_digits)
from pyengine.models.zoo import digits_vit


def tiny_vit(**kw):
    return digits_vit(**{"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1,
                         "num_heads": 2, **kw})


def subset_loader(split="train", n=128, batch=32, shuffle=True, augment=False):
    ds = Subset(digits(split, img_size=16, augment=augment), range(n))
    sampler = EpochSampler(n, seed=0, shuffle=shuffle)
    return DataLoader(ds, batch_size=batch, sampler=sampler, drop_last=shuffle)


def test_loss_goes_down_and_learns():
    seed_everything(0)
    model = tiny_vit(patch_size=8, global_pool="avg", pos_temperature=20.0)
    hist = fit(model, subset_loader(n=320), subset_loader("val", n=200, shuffle=False),
               epochs=6, lr=3e-3, warmup_steps=5, progress=False)
    assert [r["epoch"] for r in hist] == list(range(1, 7))
    assert hist[-1]["step"] == 6 * 10
    assert hist[-1]["loss"] < 0.7 * hist[0]["loss"]
    assert hist[-1]["val_top1"] > 40.0  # chance is 10%
    assert hist[-1]["val_top1"] == evaluate(model, subset_loader("val", n=200, shuffle=False))


def test_evaluate_matches_manual_count():
    model = tiny_vit().eval()
    loader = subset_loader("val", n=90, batch=32, shuffle=False)
    with torch.no_grad():
        x, y = digits("val", img_size=16).tensors
        want = 100.0 * (model(x[:90]).argmax(-1) == y[:90]).double().mean().item()
    assert evaluate(model, loader) == pytest.approx(want, abs=1e-9)
    assert model.training is False
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, DataLoader(TensorDataset(x[:0], y[:0]), batch_size=4))


def test_kd_loss_equals_hand_computation():
    s, t, T = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64), 3.0
    ps, pt = torch.softmax(s / T, -1), torch.softmax(t / T, -1)
    want = (pt * (pt.log() - ps.log())).sum(-1).mean() * T * T
    assert kd_loss(s.float(), t.float(), T).item() == pytest.approx(want.item(), rel=1e-5)
    assert kd_loss(t.float(), t.float(), T).item() == pytest.approx(0.0, abs=1e-6)


def test_fit_with_teacher_logs_the_distillation_loss():
    # lr 0 keeps the weights fixed, so the logged loss of one batch is checkable by hand
    student, teacher = tiny_vit(), tiny_vit(embed_dim=48)
    x, y = digits("train", img_size=16).tensors
    x, y = x[:24], y[:24]
    loader = DataLoader(TensorDataset(x, y), batch_size=24)
    a, T = 0.3, 2.5
    with torch.no_grad():
        s_out, t_out = student(x), teacher(x)
        ps = torch.log_softmax(s_out.double() / T, -1)
        pt = torch.log_softmax(t_out.double() / T, -1)
        kd = (pt.exp() * (pt - ps)).sum(-1).mean() * T * T
        want = (1 - a) * F.cross_entropy(s_out.double(), y) + a * kd
    hist = fit(student, loader, epochs=1, lr=0.0, weight_decay=0.0, teacher=teacher,
               kd_alpha=a, kd_temperature=T, progress=False)
    assert hist[0]["loss"] == pytest.approx(want.item(), rel=1e-5)
    assert teacher.training is False


def test_amp_bf16_on_cpu_matches_fp32():
    seen = []

    def spy(model, logits, x, y, step):
        seen.append(logits.dtype)
        return logits.new_zeros(()).float()

    runs = {}
    init = tiny_vit().state_dict()
    for amp in (None, "bf16"):
        model = tiny_vit()
        model.load_state_dict(init)
        # SGD: updates proportional to gradients, so bf16 gradient error shows as-is
        hist = fit(model, subset_loader(n=96), subset_loader("val", n=64, shuffle=False),
                   epochs=2, lr=0.05, optimizer="sgd", amp=amp, extra_loss=spy,
                   progress=False)
        runs[amp] = (model, hist)
    assert seen[:6] == [torch.float32] * 6 and seen[6:] == [torch.bfloat16] * 6
    (m32, h32), (m16, h16) = runs[None], runs["bf16"]
    for r32, r16 in zip(h32, h16):
        assert r16["loss"] == pytest.approx(r32["loss"], rel=2e-2)
    for (k, p32), p16 in zip(m32.named_parameters(), m16.parameters()):
        assert p16.dtype == torch.float32  # master weights stay fp32
        d32, d16 = p32 - init[k], p16 - init[k]
        assert d32.norm() > 0
        assert (d16 - d32).norm() <= 0.1 * d32.norm() + 1e-6, k  # same training, bf16 noise
    with pytest.raises(ValueError, match="amp"):
        fit(tiny_vit(), subset_loader(n=64), epochs=1, amp="fp8", progress=False)


def test_param_groups_extra_loss_logs_and_on_step():
    model = tiny_vit()
    head = list(model.head.parameters())
    rest = [p for n, p in model.named_parameters() if not n.startswith("head.")]
    head_before = [p.detach().clone() for p in head]
    rest_before = [p.detach().clone() for p in rest]
    calls = []

    def extra(model, logits, x, y, step):
        reg = 1e-4 * sum(p.square().sum() for p in rest)
        return reg, {"reg": reg, "step_seen": float(step)}

    hist = fit(model, subset_loader(n=96), epochs=2, lr=1e-2, progress=False,
               param_groups=[{"params": rest}, {"params": head, "lr": 0.0, "weight_decay": 0.0}],
               extra_loss=extra, on_step=lambda s, t: calls.append((s, t)), log=None)
    assert calls == [(s, 6) for s in range(6)]
    assert [r["step_seen"] for r in hist] == [1.0, 4.0]  # epoch means of the logged values
    assert all(r["reg"] > 0 for r in hist)
    assert all(torch.equal(a, b) for a, b in zip(head, head_before))  # lr 0 group frozen
    assert all(not torch.equal(a, b) for a, b in zip(rest, rest_before))


def test_default_param_groups_exempt_norms_biases_embeddings():
    model = tiny_vit()
    decay, no_decay = default_param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert {"pos_embed", "cls_token", "fc_norm.weight", "head.bias"} <= nd
    assert {n for n, p in model.named_parameters() if p.ndim == 1} <= nd
    assert {"blocks.0.attn.qkv.weight", "head.weight", "patch_embed.proj.weight"} <= d
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_sgd_and_log_file(tmp_path):
    logfile = tmp_path / "log.jsonl"
    hist = fit(tiny_vit(), subset_loader(n=64), epochs=2, lr=1e-2, optimizer="sgd",
               log=str(logfile), progress=False, grad_clip=0.5)
    rows = [json.loads(line) for line in logfile.read_text().splitlines()]
    assert rows == hist
    with pytest.raises(ValueError, match="optimizer"):
        make_optimizer(tiny_vit().parameters(), "lamb")


def test_same_seed_same_run_and_shuffled_order():
    def run(seed):
        torch.manual_seed(0)
        m = tiny_vit(drop_rate=0.1)
        fit(m, subset_loader(n=64, augment=True), epochs=2, lr=1e-3, seed=seed,
            progress=False)
        return torch.cat([p.flatten() for p in m.parameters()])
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_lr_schedule():
    assert [lr_factor(s, 10, 2) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, 10, 2) == 1.0
    assert lr_factor(6, 10, 2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert lr_factor(10, 10, 2) == pytest.approx(0.0, abs=1e-12)


def test_bad_arguments():
    loader = subset_loader(n=64)
    for kw, match in [(dict(epochs=-1), "epochs"), (dict(epochs=1, kd_alpha=1.5), "kd_alpha"),
                      (dict(epochs=1, resume=True), "checkpoint_dir"),
                      (dict(epochs=1, checkpoint_every=0), "checkpoint_every"),
                      (dict(epochs=1, kd_temperature=0), "kd_temperature")]:
        with pytest.raises(ValueError, match=match):
            fit(tiny_vit(), loader, progress=False, **kw)
    with pytest.raises(TypeError, match="extra_state"):
        fit(tiny_vit(), loader, epochs=1, extra_state={"x": 3}, progress=False)
    with pytest.raises(TypeError, match="param_groups"):
        fit(tiny_vit(), loader, epochs=1, param_groups=[[1]], progress=False)
    with pytest.raises(TypeError, match="seed"):
        seed_everything(1.5)
    with pytest.raises(ValueError, match="recipe keys"):
        train_digits(recipe={"epoch": 3})


def test_train_digits_runs_the_recipe_plumbing():
    assert {"epochs", "lr", "batch_size", "img_size", "augment", "warmup_epochs"} <= set(
        DIGITS_RECIPE)
    model = tiny_vit(img_size=DIGITS_RECIPE["img_size"], patch_size=8)
    model, hist = train_digits(model, recipe={"epochs": 1}, progress=False)
    assert len(hist) == 1 and hist[0]["val_top1"] > 10.0


def test_recipe_runner_writes_result_json(tmp_path):
    from pyengine.cli.train_digits import main
    out = tmp_path / "r" / "digits_recipe.json"
    assert main(["--out", str(out), "--threads", "1", "--recipe", '{"epochs": 1}',
                 "--model", '{"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 8}']) == 0
    res = json.loads(out.read_text())
    assert res["epochs"] == 1 and len(res["history"]) == 1
    assert res["dense_top1"] == res["history"][-1]["val_top1"]
    assert res["machine"]["threads"] == 1 and res["model"]["depth"] == 1
    assert res["cpu_s"] > 0 and res["wall_s"] > 0
