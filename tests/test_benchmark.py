"""benchmark.py smoke test: a tiny CLIP, a few rounds; the JSON has every number, all positive."""

import json

import pytest
import torch

import benchmark


def test_benchmark_smoke(tiny_clip, tmp_path, capsys):
    out = tmp_path / 'bench.json'
    threads = torch.get_num_threads()
    try:  # one thread: tiny ops on busy shared cores wait on each other's time slices with two
        benchmark.main(['--clip-model', tiny_clip, '--device', 'cpu', '--size', '64', '--repeats', '2',
                        '--classes', '5', '--n-prompts', '3', '--text-classes', '5', '--threads', '1',
                        '--out', str(out), '--no-progress'])
    finally:
        torch.set_num_threads(threads)
    r = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert 'TagCLIP' in capsys.readouterr().out

    for k in ('trusty', 'no_trusty'):
        p = r['params'][k]
        assert 0 < p['learnable'] < p['total'] and p['learnable'] == p['learnable_backbone'] + p['learnable_decoder']
    # the trusty token and the Trusty Learner are the only difference in learnable parameters
    d = 32
    extra = d + 4 * d * d + 4 * d + 2 * d  # t_A, MHSA in/out projections with biases, LayerNorm
    assert r['params']['trusty']['learnable'] - r['params']['no_trusty']['learnable'] == extra
    assert r['params']['trusty']['frozen_clip'] == r['params']['no_trusty']['frozen_clip']

    variants = ('bare', 'encoder', 'no_trusty', 'trusty', 'slide', 'batch', 'bare_train', 'train')
    for k in variants:
        t = r['latency'][k]
        assert len(t['all_ms']) == 2 and 0 < t['min_ms'] <= t['median_ms'] and t['images_per_s'] > 0
        assert r['peak_memory_mib'][k] > 0 and r['peak_memory_added_mib'][k] >= 0
    # bare tower, counted exactly (attention included: the fused kernels must not hide it):
    # patch conv + L blocks x (12 T D^2 linear + 2 T^2 D attention) + projection of the T tokens
    N, p, D, L, T = 16, 16, 64, 2, 17
    assert round(r['gmacs']['bare'] * 1e9) == N * 3 * p * p * D + L * (12 * T * D * D + 2 * T * T * D) + T * D * d
    # its training row, B = 2: the forward, then a backward through every block and the projection that
    # computes input gradients only (the weights are frozen; attention's backward is twice its forward)
    B = r['setup']['train_batch']
    assert B == 2 and r['latency']['train']['images_per_s'] == pytest.approx(2e3 / r['latency']['train']['median_ms'])
    backward = L * (12 * T * D * D + 4 * T * T * D) + T * D * d
    assert round(r['gmacs']['bare_train'] * 1e9) == B * (round(r['gmacs']['bare'] * 1e9) + backward)
    # the decoder and the prompts only add work; GMACs are half the counted FLOPs
    g = r['gflops']
    assert 0 < g['bare'] < g['encoder'] < g['no_trusty'] < g['trusty']
    assert 2 * g['trusty'] < g['train'] and g['bare_train'] < g['train']
    assert abs(r['gmacs']['trusty'] * 2 - g['trusty']) < 1e-9
    for k in ('trusty / bare', 'trusty / no_trusty', 'slide / batch', 'no_trusty / bare', 'encoder / bare',
              'train / bare_train'):
        assert r['ratios'][k]['median'] > 0 and r['ratios'][k]['min'] > 0
    assert r['ratios']['slide / batch']['target'] == 1.05 and isinstance(r['ratios']['slide / batch']['met'], bool)
    assert r['text_encoding']['prompts'] == 5 * 15 and r['text_encoding']['seconds'] > 0
