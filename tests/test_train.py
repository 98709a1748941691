"""train.py: overfitting, exact resume, DDP gradient averaging, the transductive jobs, bad input."""

import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import train
from losses import TagCLIPLoss
from checkpoint import build_model
from model import TagCLIPConfig
from tests.conftest import TINY_CLIP
from toy import generate_world


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp('toy')
    generate_world(root, n_train=16, n_val=4, seed=0)
    return root


def argv(world, out, *extra):
    return ['--dataset', 'toy', '--data-root', str(world), '--toy-images', '16', '4', '--clip-model', 'tiny_test_clip',
            '--pretrained', 'none', '--n-prompts', '2', '--heads', '4', '--workers', '0', '--out-dir', str(out),
            '--warmup', '2', '--log-every', '1', *extra]


def final_weights(out):
    return torch.load(Path(out) / 'last.pt', weights_only=True)['model']


def test_overfits_a_fixed_batch():
    torch.manual_seed(0)
    model = build_model(TagCLIPConfig(clip_model='tiny_test_clip', pretrained=None, n_prompts=2, heads=4)).train()
    crit = TagCLIPLoss(trusty=True)
    opt = torch.optim.AdamW(model.param_groups(1e-3, 0.01))
    label = torch.full((2, 64, 64), 255)
    label[0, :32], label[0, 32:, :40], label[1, :, 20:] = 0, 1, 2
    unseen = torch.zeros_like(label, dtype=torch.bool)
    unseen[1, :, :20] = True
    colours = torch.tensor([[2.0, -1, -1], [-1, 2, -1], [-1, -1, 2], [0, 0, 0]])  # one per class, grey background
    images = colours[torch.where(label == 255, 3, label)].permute(0, 3, 1, 2) + 0.3 * torch.randn(2, 3, 64, 64)
    text = model.encode_text(['red', 'green', 'blue'])
    losses = []
    for _ in range(100):
        loss = crit(model(images, text), label, unseen)['loss']
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.35 * losses[0], losses
    with torch.no_grad():
        logits = torch.nn.functional.interpolate(model.eval()(images, text)['pred_masks'], size=(64, 64), mode='bilinear')
    assert (logits[:, :3].argmax(1) == label)[label != 255].float().mean() > 0.9


def test_resume_is_exact(world, tmp_path, monkeypatch):
    train.main(argv(world, tmp_path / 'unbroken', '--iters', '6', '--eval-every', '3'))
    save = train.save_checkpoint

    def save_then_die(path, ckpt):  # the run is killed right after its step-3 checkpoint
        save(path, ckpt)
        if ckpt['step'] == 3 and Path(path).name == 'last.pt':
            raise KeyboardInterrupt

    monkeypatch.setattr(train, 'save_checkpoint', save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.main(argv(world, tmp_path / 'broken', '--iters', '6', '--eval-every', '3'))
    monkeypatch.setattr(train, 'save_checkpoint', save)
    assert torch.load(tmp_path / 'broken' / 'last.pt', weights_only=True)['step'] == 3
    metrics = train.main(argv(world, tmp_path / 'broken', '--iters', '6', '--eval-every', '3', '--resume', 'auto'))
    a, b = final_weights(tmp_path / 'unbroken'), final_weights(tmp_path / 'broken')
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert metrics is not None and (tmp_path / 'broken' / 'metrics.json').exists()
    assert (tmp_path / 'broken' / 'best.pt').exists()
    log = [json.loads(l) for l in (tmp_path / 'broken' / 'log.jsonl').read_text().splitlines()]
    assert [r['step'] for r in log if 'loss' in r] == [1, 2, 3, 4, 5, 6]


def test_resume_with_workers_and_evaluations_is_exact(world, tmp_path, monkeypatch):
    """Killed after its step-2 checkpoint with a data worker, two evaluations still to come: the
    resumed run ends bit-identical to the unbroken one; its log has each step once; a restart at
    the end writes metrics.json again."""
    run = lambda out, *extra: train.main(argv(world, tmp_path / out, '--iters', '6', '--eval-every', '2',
                                              '--workers', '1', '--batch-size', '2', *extra))
    run('unbroken')
    save = train.save_checkpoint

    def save_then_die(path, ckpt):
        save(path, ckpt)
        if ckpt['step'] == 2 and Path(path).name == 'last.pt':
            raise KeyboardInterrupt

    monkeypatch.setattr(train, 'save_checkpoint', save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run('broken')
    monkeypatch.setattr(train, 'save_checkpoint', save)
    with open(tmp_path / 'broken' / 'log.jsonl', 'a') as f:  # a line written after the checkpoint, then lost
        f.write(json.dumps({'step': 3, 'loss': 1.0}) + '\n')
    run('broken', '--resume', 'auto')
    a, b = (torch.load(tmp_path / out / 'last.pt', weights_only=True) for out in ('unbroken', 'broken'))
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    assert all(torch.equal(x['torch'], y['torch']) for x, y in zip(a['rng'], b['rng']))
    logs = [[json.loads(line) for line in (tmp_path / out / 'log.jsonl').read_text().splitlines()]
            for out in ('unbroken', 'broken')]
    steps = [(e['step'], 'eval' in e) for e in logs[1]]
    assert steps == [(e['step'], 'eval' in e) for e in logs[0]] and len(set(steps)) == len(steps)
    assert [e.get('loss') for e in logs[1]] == [e.get('loss') for e in logs[0]]
    (tmp_path / 'broken' / 'metrics.json').unlink()
    run('broken', '--resume', 'auto')  # at its last step already: nothing to train, the metrics again
    assert json.loads((tmp_path / 'broken' / 'metrics.json').read_text())['step'] == 6
    config = json.loads((tmp_path / 'broken' / 'config.json').read_text())  # the resolved recipe on record
    assert config['args']['iters'] == 6 and config['resolved']['accumulation_steps'] == 1
    assert config['resolved']['precision'] == 'fp32' and config['resolved']['normalize'] == 'clip'


class RecordingAdamW(torch.optim.AdamW):
    """Saves the gradients it sees at its first step to $GRAD_FILE (with the rank in the name)."""

    def step(self, *a, **k):
        if not getattr(self, 'recorded', False):
            grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for g in self.param_groups for p in g["params"]]
            torch.save(grads, os.environ['GRAD_FILE'].format(rank=os.environ.get('RANK', 0)))
            self.recorded = True
        return super().step(*a, **k)


def _ddp_worker(rank, port, cfg_file, args):
    import open_clip
    open_clip.add_model_config(cfg_file)
    torch.set_num_threads(1)
    torch.optim.AdamW = RecordingAdamW
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    train.main(args)


def test_two_ranks_equal_one_with_double_batch(world, tmp_path, monkeypatch):
    common = ['--iters', '3', '--eval-every', '3', '--no-eval', '--dropout', '0', '--prompt-dropout', '0']
    cfg_file = tmp_path / 'tiny_test_clip.json'
    cfg_file.write_text(json.dumps(TINY_CLIP))
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    monkeypatch.setenv('GRAD_FILE', str(tmp_path / 'ddp-grads-{rank}.pt'))
    # the two ranks accumulate their 2 images as 2 micro-batches of 1 (no gradient sync on the first)
    mp.spawn(_ddp_worker, args=(port, str(cfg_file), argv(world, tmp_path / 'ddp', '--batch-size', '4',
                                                            '--micro-batch', '1', *common)),
             nprocs=2, join=True)
    monkeypatch.setattr(torch.optim, 'AdamW', RecordingAdamW)
    for out, extra in (('single', []), ('micro', ['--micro-batch', '2'])):
        monkeypatch.setenv('GRAD_FILE', str(tmp_path / f'{out}-grads.pt'))
        train.main(argv(world, tmp_path / out, '--batch-size', '4', *extra, *common))
    # the first step's gradients: each rank holds the average over both ranks = the batch-of-4 gradient,
    # and so does one process accumulating 2 micro-batches of 2
    g0, g1, g, gm = (torch.load(tmp_path / f, weights_only=True)
                     for f in ('ddp-grads-0.pt', 'ddp-grads-1.pt', 'single-grads.pt', 'micro-grads.pt'))
    assert all(torch.equal(x, y) for x, y in zip(g0, g1))
    assert all(torch.allclose(x, y, rtol=1e-4, atol=1e-7) for x, y in zip(g0, g))
    assert all(torch.allclose(x, y, rtol=1e-4, atol=1e-7) for x, y in zip(gm, g))
    assert max((x - y).abs().max() for x, y in zip(gm, g)) < 1e-6 and max((x - y).abs().max() for x, y in zip(g0, g)) < 1e-6
    # weights after 3 AdamW steps: Adam normalises the ~1e-9 gradients of a few biases, whose rounding
    # differs between the runs, into steps of up to lr (~4e-4) — hence the tolerance
    a, b = final_weights(tmp_path / 'ddp'), final_weights(tmp_path / 'single')
    assert all(torch.allclose(a[k], b[k], atol=4e-4) for k in a)
    before = build_model(TagCLIPConfig(clip_model='tiny_test_clip', pretrained=None, n_prompts=2, heads=4))
    assert not torch.allclose(before.prompts, a['prompts'], atol=1e-3)  # training did move the weights


def test_transductive_is_two_jobs(world, tmp_path, monkeypatch):
    """Phase 1 (seen vocabulary) to half of --iters on its poly schedule, then phase 2 (every class,
    a fresh warm-up) from phase 1's last.pt: equal to phase 2 started alone with --init-from, and to
    runs killed at the phase boundary or inside phase 2 and resumed with --resume auto."""
    vocab_sizes = []
    forward = TagCLIPLoss.forward
    monkeypatch.setattr(TagCLIPLoss, 'forward', lambda self, out, *a: vocab_sizes.append(out['pred_masks'].shape[1]) or forward(self, out, *a))
    run = lambda out, *extra: train.main(argv(world, tmp_path / out, '--setting', 'transductive', '--iters', '8',
                                              '--eval-every', '2', '--no-eval', '--batch-size', '2', *extra))
    run('t', '--phase2-batch-size', '1')
    assert vocab_sizes == [20 + 1] * 4 + [26 + 1] * 4  # 20 seen classes (background too), then all 26
    logs = [[json.loads(line) for line in (tmp_path / 't' / p / 'log.jsonl').read_text().splitlines()] for p in ('phase1', 'phase2')]
    assert [r['step'] for r in logs[0]] == [1, 2, 3, 4] and [r['step'] for r in logs[1]] == [1, 2, 3, 4]
    args = train.get_args(argv(world, 'x', '--iters', '8', '--batch-size', '2'))
    assert logs[0][-1]['lr'] == pytest.approx(args.lr * train.lr_lambda(args)(4))  # half-way down an 8-step poly
    args.iters = 4
    assert logs[1][0]['lr'] == pytest.approx(args.lr * train.lr_lambda(args)(1))  # the warm-up again, over 4 steps
    first, second = (torch.load(tmp_path / 't' / p / 'last.pt', weights_only=True) for p in ('phase1', 'phase2'))
    assert (first['setting'], first['step'], second['setting'], second['step']) == ('inductive', 4, 'transductive', 4)
    assert json.loads((tmp_path / 't' / 'phase2' / 'config.json').read_text())['args']['batch_size'] == 1

    run('alone', '--phase2-batch-size', '1', '--init-from', str(tmp_path / 't' / 'phase1' / 'last.pt'))
    assert not (tmp_path / 'alone' / 'phase1').exists()
    b = final_weights(tmp_path / 'alone' / 'phase2')
    assert all(torch.equal(second['model'][k], b[k]) for k in b)

    save = train.save_checkpoint
    for phase, at in ((1, 4), (2, 2)):
        def save_then_die(path, ckpt):  # killed right after this checkpoint
            save(path, ckpt)
            if (ckpt['args']['phase'], ckpt['step']) == (phase, at) and Path(path).name == 'last.pt':
                raise KeyboardInterrupt
        monkeypatch.setattr(train, 'save_checkpoint', save_then_die)
        with pytest.raises(KeyboardInterrupt):
            run(f'broken{phase}', '--phase2-batch-size', '1')
        monkeypatch.setattr(train, 'save_checkpoint', save)
        run(f'broken{phase}', '--phase2-batch-size', '1', '--resume', 'auto')
        b = final_weights(tmp_path / f'broken{phase}' / 'phase2')
        assert all(torch.equal(second['model'][k], b[k]) for k in b), phase
        log = (tmp_path / f'broken{phase}' / 'phase2' / 'log.jsonl').read_text().splitlines()
        assert [json.loads(line)['step'] for line in log] == [1, 2, 3, 4]


def test_transductive_phases_follow_the_authors():
    """VOC: token on, then off with the self-attention kept; COCO-Stuff: token on, phase 2 at batch 8."""
    voc = train.jobs(train.get_args(['--dataset', 'voc', '--data-root', 'x', '--setting', 'transductive']))
    coco = train.jobs(train.get_args(['--dataset', 'coco_stuff', '--data-root', 'x', '--setting', 'transductive']))
    assert [(j.setting, j.trusty, j.iters, j.stop_at, j.batch_size) for j in voc] == \
        [('inductive', 'on', 20000, 10000, 16), ('transductive', 'no-token', 10000, 10000, 16)]
    assert [(j.setting, j.trusty, j.iters, j.stop_at, j.batch_size) for j in coco] == \
        [('inductive', 'on', 80000, 40000, 16), ('transductive', 'on', 40000, 40000, 8)]
    cfg = train.model_config(voc[1])
    assert not cfg.trusty and cfg.trusty_learner and voc[1].weight_focal == 20
    zeg = train.model_config(train.get_args(['--dataset', 'voc', '--data-root', 'x', '--no-trusty']))
    assert not zeg.trusty and not zeg.trusty_learner


    logits = torch.zeros(1, 4, 1, 3)
    logits[0, 1, 0, :] = torch.tensor([5.0, -5.0, 5.0])   # unseen class 1
    logits[0, 2, 0, :] = torch.tensor([-5.0, 5.0, -5.0])  # unseen class 2
    logits[0, 0, 0, :] = 9.0                              # a seen class scores highest everywhere
    label = torch.tensor([[[255, 255, 0]]])
    unseen = torch.tensor([[[True, True, False]]])
    assert train.pseudo_label(logits, label, unseen, [1, 2]).tolist() == [[[1, 2, 0]]]
    label = torch.tensor([[[255, 0, 255]]])
    unseen = torch.tensor([[[False, False, True]]])       # plain 255 stays 255, seen labels stay
    assert train.pseudo_label(logits, label, unseen, [1, 2]).tolist() == [[[255, 0, 1]]]


def test_lr_schedule_warmup_and_poly():
    args = train.get_args(['--iters', '100', '--warmup', '10', '--lr', '1e-3', '--min-lr', '1e-6'])
    f = train.lr_lambda(args)
    assert f(0) == pytest.approx(1e-6 * ((1 - 1e-3) + 1e-3), rel=1e-6)
    assert f(5) == pytest.approx((1 - 0.5 * (1 - 1e-6)) * ((0.95 ** 0.9) * (1 - 1e-3) + 1e-3))
    assert f(100) == pytest.approx(1e-3)  # min_lr / lr


def test_bad_input_fails_early(world, tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match='VOC2012'):
        train.main(['--dataset', 'voc', '--data-root', str(tmp_path / 'nowhere'), '--pretrained', 'none',
                    '--clip-model', 'tiny_test_clip', '--heads', '4', '--out-dir', str(tmp_path / 'v')])
    with pytest.raises(SystemExit, match='does not divide'):
        monkeypatch.setenv('RANK', '0')
        monkeypatch.setattr(train, 'setup_distributed', lambda: (0, 3, torch.device('cpu')))
        train.main(argv(world, tmp_path / 'd', '--batch-size', '4'))
    monkeypatch.undo()
    train.main(argv(world, tmp_path / 'a', '--iters', '1', '--eval-every', '1', '--no-eval'))
    with pytest.raises(SystemExit, match='another model config'):
        train.main(argv(world, tmp_path / 'b', '--iters', '1', '--n-prompts', '5', '--init-from', str(tmp_path / 'a' / 'last.pt')))
    with pytest.raises(SystemExit, match='another model config'):  # a resume must match exactly
        train.main(argv(world, tmp_path / 'a', '--iters', '2', '--no-trusty', '--resume', str(tmp_path / 'a' / 'last.pt')))
    with pytest.raises(SystemExit, match='missing.pt: no such file'):
        train.main(argv(world, tmp_path / 'b', '--resume', str(tmp_path / 'missing.pt')))


def test_non_finite_loss_stops_with_the_term(world, tmp_path, monkeypatch):
    forward = TagCLIPLoss.forward

    def broken(self, *a):
        out = forward(self, *a)
        out['loss_dice'] = out['loss_dice'] * float('nan')
        return out

    monkeypatch.setattr(TagCLIPLoss, 'forward', broken)
    with pytest.raises(SystemExit, match=r'step 0: non-finite loss_dice'):
        train.main(argv(world, tmp_path / 'n', '--iters', '2', '--no-eval'))


@pytest.mark.parametrize('amp,dtype', [('bf16', torch.bfloat16), ('fp16', torch.float16)])
def test_mixed_precision_steps(world, tmp_path, monkeypatch, amp, dtype):
    """CPU autocast (bf16; fp16 with the GradScaler): the forward runs in `dtype`, losses, weights and
    the evaluation stay finite float32."""
    seen = []
    forward = TagCLIPLoss.forward
    monkeypatch.setattr(TagCLIPLoss, 'forward', lambda self, out, *a: seen.append(out['pred_masks'].dtype) or forward(self, out, *a))
    metrics = train.main(argv(world, tmp_path / amp, '--iters', '2', '--eval-every', '2', '--amp', amp))
    assert seen == [dtype] * 2
    ckpt = torch.load(tmp_path / amp / 'last.pt', weights_only=True)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in ckpt['model'].values())
    before = build_model(TagCLIPConfig(clip_model='tiny_test_clip', pretrained=None, n_prompts=2, heads=4))
    assert not torch.allclose(before.prompts, ckpt['model']['prompts'], atol=1e-4)  # the steps were taken
    if amp == 'fp16':  # the scaler ran: its scale is in the checkpoint (65536, halved per overflow)
        assert 0 < ckpt['scaler']['scale'] <= 65536.0
    else:
        assert ckpt['scaler'] == {}
    log = [json.loads(l) for l in (tmp_path / amp / 'log.jsonl').read_text().splitlines()]
    assert [r['step'] for r in log if 'loss' in r] == [1, 2] and all(math.isfinite(r['loss']) for r in log if 'loss' in r)
    assert 0 < metrics['summary']['pAcc'] <= 100 and math.isfinite(metrics['summary']['mIoU(S)'])


def test_toy_recipe_and_real_defaults():
    toy = train.get_args([])
    assert (toy.batch_size, toy.iters, toy.trusty_loss, toy.trusty_alpha, toy.photometric) == (8, 3000, 'focal', 0.75, 'off')
    voc = train.get_args(['--dataset', 'voc', '--data-root', 'x'])  # the authors' recipe
    assert (voc.batch_size, voc.iters, voc.trusty_loss, voc.trusty_alpha, voc.photometric) == (16, 20000, 'focal', 0.25, 'on')
    assert train.get_args(['--trusty-alpha', '0.25']).trusty_alpha == 0.25
    # the authors' normalisation, precision and reporting on real data; the toy world keeps its own
    assert (voc.normalize, voc.amp, voc.save_best, toy.normalize, toy.save_best) == ('imagenet', 'off', 'off', 'clip', 'on')
    assert train.model_config(voc).imagenet_mean_std and not train.model_config(toy).imagenet_mean_std
    assert train.model_config(voc).fp32_inference
