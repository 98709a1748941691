"""The toy world end to end in under a minute: world -> tiny CLIP -> train -> evaluate -> infer.

Reduced so that it fits the suite: a 10-step CLIP knows no concept yet (the demo's 400-step CLIP
reaches 96% zero-shot accuracy in ~4 min, and TagCLIP then ~50 mIoU(S)), so this run checks that
every stage runs on the real code path and that training lowers the loss, not segmentation quality.
"""

import json

import infer
import train
from toy import generate_world, pretrain_clip


def test_toy_world_end_to_end(tmp_path):
    world = generate_world(tmp_path / 'toy', n_train=64, n_val=12, seed=0)
    clip = pretrain_clip(tmp_path / 'toy' / 'clip.pt', steps=10, batch=32, seed=0)
    out = tmp_path / 'run'
    metrics = train.main(['--data-root', str(world), '--toy-images', '64', '12', '--pretrained', str(clip),
                          '--iters', '60', '--eval-every', '30', '--warmup', '10', '--log-every', '10',
                          '--workers', '0', '--out-dir', str(out)])
    assert (out / 'last.pt').exists() and (out / 'best.pt').exists()
    saved = json.loads((out / 'metrics.json').read_text())
    assert saved['summary'] == metrics['summary'] and saved['step'] == 60
    assert set(metrics['per_class']) == set(train.DATASETS['toy'].classes)
    assert 0 < metrics['summary']['pAcc'] <= 100
    log = [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]
    losses = [r['loss'] for r in log if 'loss' in r]
    assert len(losses) == 6 and losses[-1] < 0.5 * losses[0], losses
    assert [r['step'] for r in log if 'eval' in r] == [30, 60]

    infer.main(['--checkpoint', str(out / 'last.pt'), '--input', str(world / 'images' / 'val'),
                '--output', str(tmp_path / 'masks'), '--classes', 'red solid,red striped,blue dotted,sky'])
    masks = list((tmp_path / 'masks').glob('*.label.png'))
    assert len(masks) == 12
    summary = json.loads((tmp_path / 'masks' / 'summary.json').read_text())
    flags = {v['name']: v['seen'] for v in summary['vocabulary']}
    assert flags == {'red solid': True, 'red striped': False, 'blue dotted': True, 'sky': False}
