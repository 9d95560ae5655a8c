"""benchmarks/bench_throughput.py's rows in benchmarks/results/*.json: one flat object per row and mode, the keys
every device's runs share, appended to the day's file."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks'))

import bench_throughput  # noqa: E402

KEYS = {'device', 'date', 'commit', 'model', 'row', 'backend', 'mode', 'batch_size', 'img_size', 'amp', 'img_per_s',
        'ms_per_img', 'peak_gb', 'isa', 'threads', 'note'}


def _cell(img_s, isa):
    return dict(img_s=img_s, ms_img=1e3 / img_s, batch_size=8, backend='cpu_kernel/cpu_kernel', rss_gb=1.5,
                threads=2, isa=isa)


def test_rows_appended_to_the_days_file(tmp_path):
    args = SimpleNamespace(device='cpu', img_size=224, amp='none', results_dir=str(tmp_path))
    results = [
        dict(spec=dict(model='rsmamba_base', row='ours', note=''), eval=_cell(5.0, 'avx512'),
             train=_cell(1.5, 'avx512')),
        dict(spec=dict(model='deit_tiny_patch16_224', row='deit_tiny', note=''), eval=_cell(30.0, 'avx512'),
             train=dict(error='timed out')),  # a failed cell writes no row
    ]
    path = bench_throughput.append_result_rows(results, args)
    path_again = bench_throughput.append_result_rows(results[:1], args)
    assert path == path_again and os.path.dirname(path) == str(tmp_path) and path.endswith('.json')
    with open(path) as f:
        rows = json.load(f)
    assert [(r['row'], r['mode']) for r in rows] == [('ours', 'eval'), ('ours', 'train'), ('deit_tiny', 'eval'),
                                                    ('ours', 'eval'), ('ours', 'train')]
    assert all(set(r) == KEYS for r in rows)
    first = rows[0]
    assert first['amp'] == 'fp32' and first['isa'] == 'avx512' and first['img_per_s'] == 5.0
    assert first['peak_gb'] == 1.5 and first['device'] == bench_throughput.cpu_name()


def test_paired_ratios_are_medians_of_the_steps_own_ratios(capsys):
    """With --paired the floor target takes the median of per-step ratios (1.1, 1.5, 1.3: +30%), not the ratio
    of the median times (240 / 200: +20%), and the rows' notes keep the steps."""
    ours, floor = _cell(1 / 0.03, 'avx2'), _cell(1 / 0.025, 'avx2')
    ours['step_s'], floor['step_s'] = [8 * 0.022, 8 * 0.030, 8 * 0.026], [8 * 0.020, 8 * 0.020, 8 * 0.020]
    results = [dict(spec=dict(model='rsmamba_base', row=row, note=''), train=cell)
               for row, cell in (('ours', ours), ('floor', floor))]
    args = SimpleNamespace(models=['rsmamba_base'], paired=True, ref_no_ckpt=False, img_size=224, batch_size=8,
                           amp='none', device='cpu', results_dir='')
    bench_throughput.print_ratios(results, {}, args, 'cpu')
    out = capsys.readouterr().out
    assert "train time over the no-scan floor, the median of the paired steps' ratios: +30.0%" in out
    reference = _cell(1 / 0.1, 'avx2')  # per step 4.0x, 3.5x, 5.0x ours: 4.0x (the cells' ms/img: 3.33x)
    reference['step_s'] = [8 * 0.088, 8 * 0.105, 8 * 0.130]
    results.append(dict(spec=dict(model='rsmamba_base', row='reference', note=''), train=reference))
    bench_throughput.print_ratios(results, {}, args, 'cpu')
    assert ("train img/s ours / reference (reference trains with ckpt), the median of the paired steps' ratios: "
            "4.00x (target >= 4x: met)") in capsys.readouterr().out
    rows = bench_throughput.result_rows(results, args)
    assert rows[0]['note'] == 'paired: median of 3 steps taken in turn with the other rows, ms/img 22.0 30.0 26.0'


def test_unpaired_ratios_are_of_the_rows_times(capsys):
    """Without --paired the ratios are the rows' ms/img (ours 30, floor 25, reference 100), img/s the other way."""
    cells = dict(ours=_cell(1 / 0.03, 'avx2'), floor=_cell(1 / 0.025, 'avx2'), reference=_cell(1 / 0.1, 'avx2'))
    results = [dict(spec=dict(model='rsmamba_base', row=row, note=''), eval=cell) for row, cell in cells.items()]
    args = SimpleNamespace(models=['rsmamba_base'], paired=False, ref_no_ckpt=False, img_size=224, batch_size=8,
                           amp='none', device='cpu', results_dir='')
    bench_throughput.print_ratios(results, {}, args, 'cpu')
    out = capsys.readouterr().out
    assert '- eval img/s ours / reference: 3.33x (target >= 4x: MISSED)' in out
    assert '- eval time over the no-scan floor (ours ms/img / floor ms/img - 1): +20.0% (target <= +60%: met)' in out
    assert 'a scan that costs nothing): 4.00x' in out


def test_a_row_names_the_fallback_when_the_cpp_build_failed(monkeypatch):
    from timm_rsmamba.ops.cpu_kernel import CPU_KERNELS
    monkeypatch.setattr(CPU_KERNELS, 'library', None)
    monkeypatch.setattr(CPU_KERNELS, 'error', 'RuntimeError: c++ failed')
    assert (bench_throughput._ran_backend('cpu_kernel/cpu_kernel') ==
            'compiled/compiled (C++ build failed: RuntimeError: c++ failed)')
    assert bench_throughput._ran_backend('identity/torch') == 'identity/torch'
    monkeypatch.setattr(CPU_KERNELS, 'library', object())
    assert bench_throughput._ran_backend('cpu_kernel/cpu_kernel') == 'cpu_kernel/cpu_kernel'


def test_rows_appended_earlier_do_not_mark_the_commit_dirty(tmp_path, monkeypatch):
    def git(*cmd):
        subprocess.run(['git', '-c', 'user.name=t', '-c', 'user.email=t@t', *cmd], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / 'benchmarks' / 'results').mkdir(parents=True)
    (tmp_path / 'benchmarks' / 'results' / 'rows.json').write_text('[]\n')
    (tmp_path / 'benchmarks' / 'bench.py').write_text('')
    git('init', '-q')
    git('add', '-A')
    git('commit', '-qm', 'x')
    monkeypatch.setattr(bench_throughput, 'HERE', str(tmp_path / 'benchmarks'))
    clean = bench_throughput._commit()
    assert clean != '?' and not clean.endswith('-dirty')
    (tmp_path / 'benchmarks' / 'results' / 'rows.json').write_text('[{}]\n')
    assert bench_throughput._commit() == clean
    (tmp_path / 'benchmarks' / 'bench.py').write_text('x = 1\n')
    assert bench_throughput._commit() == clean + '-dirty'
