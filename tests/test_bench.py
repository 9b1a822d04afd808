"""The benchmark harness on a tiny model for a few steps: every figure is in its JSON, with sane values.

No test asserts a speed (speed targets live in the README's benchmark section)."""

import json
import statistics

import numpy as np
import pytest

from vit_jax import bench

TINY = ['--model', 'vit_ti16', '--override', 'num_layers=1', '--override', 'hidden_size=48', '--override',
        'num_heads=3', '--override', 'mlp_dim=96', '--override', 'patch_size=8', '--image-size', '32', '--batch', '8',
        '--num-classes', '10', '--steps', '2', '--warmup', '1']


def test_harness_reports_every_figure(tmp_path, capsys):
    data_dir = str(tmp_path / 'tfds')
    result = bench.main(TINY + ['--mode', 'all', '--compare', 'torch', '--data-dir', data_dir,
                                '--json', str(tmp_path / 'out.json')])
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last_line) == json.loads((tmp_path / 'out.json').read_text()) == json.loads(json.dumps(result))
    for key in ('train_images_per_s', 'infer_images_per_s', 'data_images_per_s', 'torch_train_images_per_s',
                'torch_infer_images_per_s', 'matmul_peak_flops_per_s', 'infer_latency_ms_batch1',
                'torch_infer_latency_ms_batch1', 'train_compile_s', 'host_peak_memory_bytes'):
        assert result[key] > 0, key
    for key in ('train_utilisation', 'infer_utilisation'):
        assert 0 < result[key] < 1, key
    # XLA counts 2 FLOPs per multiply-add like the analytic count; softmax, norms and GELU add a little on top.
    assert 1.0 <= result['xla_over_analytic_forward_flops'] < 1.3
    # A train step costs about 3 forward passes (forward, and two matmuls per matmul in the backward pass).
    assert 2.5 < result['train_flops_per_image'] / result['infer_flops_per_image'] < 4.0
    assert result['ratio_train_images_per_s'] == result['train_images_per_s'] / result['torch_train_images_per_s']
    rounds = result['seconds_per_round']
    assert {'train', 'infer', 'infer_batch1', 'torch_train', 'torch_infer'} <= set(rounds)
    assert all(len(t) == len(rounds['train']) > 0 for t in rounds.values())
    assert abs(statistics.median(rounds['train']) - result['train_step_s']) < 1e-5
    assert result['data_dataset'] == 'sklearn_digits'
    assert result['torch_model'] == 'export'  # our own PyTorch mirror of the model, where vit_jax.export has one


def test_huggingface_reference_and_families_beyond_vit(capsys):
    hf = bench.main(TINY + ['--mode', 'infer', '--compare', 'torch', '--torch-model', 'huggingface'])
    assert hf['torch_model'] == 'huggingface' and hf['torch_infer_images_per_s'] > 0
    # The exported mirror covers every family, so T2T-ViT compares too (Hugging Face has no T2T-ViT).
    t2t = bench.main(['--model', 't2t_vit_t14', '--override', 'num_layers=1', '--image-size', '32', '--batch', '8',
                      '--num-classes', '10', '--steps', '1', '--warmup', '1', '--mode', 'train', '--compare', 'torch'])
    assert t2t['torch_model'] == 'export' and t2t['torch_train_images_per_s'] > 0
    assert t2t['ratio_train_images_per_s'] == t2t['train_images_per_s'] / t2t['torch_train_images_per_s']


def test_compile_mode_counts_model_flops_through_loops(capsys):
    """XLA's cost analysis counts a loop body once: scanned layers and micro-batches must not shrink the count."""
    two_layers = [{'num_layers=1': 'num_layers=2', '8': '64'}.get(a, a) for a in TINY] + ['--mode', 'compile']
    plain = bench.main(two_layers)
    looped = bench.main(two_layers + ['--override', 'scan_layers=true', '--override', 'remat=true',
                                      '--microbatches', '4'])
    assert plain['train_flops_per_image'] > 0 and plain['train_compile_s'] > 0
    assert abs(looped['train_flops_per_image'] / plain['train_flops_per_image'] - 1) < 1e-3
    # A quarter of the batch of 64 is alive at a time: XLA plans fewer temporaries (activations) for the step.
    assert 0 < looped['train_planned_temp_bytes'] < 0.6 * plain['train_planned_temp_bytes']
    assert plain['train_planned_bytes'] > plain['train_planned_temp_bytes']
    assert 'train_images_per_s' not in plain  # nothing was run


def test_matmuls_mode_times_every_matmul_of_the_step(capsys):
    """--mode matmuls: the step beside each of its matmuls on its own, whose FLOPs make up nearly all of the step's."""
    batch_16 = [{'8': '16'}.get(a, a) for a in TINY]  # 2 micro-batches over the tests' 8 devices
    result = bench.main(batch_16 + ['--mode', 'matmuls', '--microbatches', '2'])
    for key in ('train_step_s', 'matmuls_alone_step_s', 'matmuls_alone_attention_s', 'train_over_matmuls_alone_s'):
        assert result[key] > 0, key
    for key in ('matmuls_alone_utilisation', 'matmuls_alone_attention_utilisation', 'matmuls_alone_dense_utilisation'):
        assert 0 < result[key] < 1, key
    names = {name for name, *_ in bench.vit_matmuls(bench.build_model(bench.parse_args(TINY)), 4, 10)}
    if result['cpu_attention_kernel']:  # the kernel's forward and backward in place of XLA's six attention matmuls
        names = names - set(bench.ATTENTION_MATMULS) | {bench.ATTENTION_KERNEL}
    assert set(result['matmul_utilisation']) == names
    assert all(0 <= u < 1 for u in result['matmul_utilisation'].values())
    # XLA's count of the step adds the norms, GELU, softmax and optimizer (a larger share on a tiny model) to these.
    assert 0.85 < result['matmuls_alone_flops_per_image'] / result['train_flops_per_image'] < 1.0


def test_vit_matmuls_count_the_analytic_flops():
    """The forward matmuls listed for --mode matmuls are the analytic forward count of a ViT, to the FLOP."""
    model = bench.build_model(bench.parse_args(['--model', 'vit_ti16']))

    def einsum_flops(equation, lhs, rhs):  # 2 per multiply-add: 2 x the product of every index's size
        inputs = equation.split('->')[0].split(',')
        sizes = dict(zip(inputs[0], lhs)) | dict(zip(inputs[1], rhs))
        return 2 * int(np.prod(list(sizes.values())))

    flops = sum(einsum_flops(equation, lhs, rhs) * count
                for name, equation, lhs, rhs, count in bench.vit_matmuls(model, 1, 1000)
                if name.endswith('fwd') or name in ('q k^T', 'attn v'))
    assert flops == bench.analytic_vit_flops(model)
    # DeiT's distillation token is one more token, and its second head one more head matmul.
    distilled = {name: (lhs, count) for name, _, lhs, _, count in
                 bench.vit_matmuls(bench.build_model(bench.parse_args(['--model', 'deit_ti16_distilled'])), 1, 1000)}
    assert distilled['qkv fwd'] == ((14 * 14 + 2, 192), 12) and distilled['head fwd'] == ((1, 192), 2)
    with pytest.raises(ValueError, match='patch-stem ViT'):
        bench.vit_matmuls(bench.build_model(bench.parse_args(['--model', 't2t_vit_t14'])), 1, 10)


def test_bf16_beside_pytorch_fp32_and_autocast_with_both_peaks(capsys):
    result = bench.main(TINY + ['--mode', 'train', '--dtype', 'bfloat16', '--compare', 'torch'])
    for key in ('torch_train_images_per_s', 'torch_bf16_train_images_per_s', 'matmul_peak_flops_per_s',
                'matmul_peak_float32_flops_per_s'):
        assert result[key] > 0, key
    assert result['ratio_torch_bf16_train_images_per_s'] == (result['train_images_per_s'] /
                                                             result['torch_bf16_train_images_per_s'])
    assert result['matmul_peak_library'] in ('xla', 'mkl')
    assert result['cpu_model'] and isinstance(result['cpu_amx'], bool)


def test_flop_count_sees_through_mkl_products(monkeypatch, capsys):
    """XLA's cost analysis cannot see into a custom call: the count is the same whether projections take MKL."""
    monkeypatch.setenv('VIT_JAX_CPU_GEMM', 'xla')
    plain = bench.main(TINY + ['--mode', 'compile'])
    monkeypatch.setenv('VIT_JAX_CPU_GEMM', 'mkl')
    through_mkl = bench.main(TINY + ['--mode', 'compile'])
    assert through_mkl['cpu_gemm'] and not plain['cpu_gemm']
    assert through_mkl['train_flops_per_image'] == plain['train_flops_per_image'] > 0
