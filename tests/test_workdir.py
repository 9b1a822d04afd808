"""Workdir files through etils.epath (vit_jax.workdir): the API a gs:// workdir takes, run here on a local path."""

import os

from etils import epath

from vit_jax import workdir


def test_paths_local_made_absolute_urls_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert os.fspath(workdir.path('run')) == str(tmp_path / 'run')
    assert os.fspath(workdir.path('gs://bucket/run') / 'metrics.jsonl') == 'gs://bucket/run/metrics.jsonl'
    assert workdir.is_local(workdir.path('run')) and not workdir.is_local(workdir.path('gs://bucket/run'))


def test_write_atomic_append_and_read(tmp_path):
    p = workdir.path(tmp_path) / 'metrics.jsonl'
    assert workdir.read_text(p) is None
    workdir.append_line(p, '{"step": 1}')
    workdir.append_line(p, '{"step": 2}')
    assert workdir.read_text(p) == '{"step": 1}\n{"step": 2}\n'
    workdir.write_atomic(p, '{"step": 1}\n')
    assert p.read_text() == '{"step": 1}\n'
    assert sorted(f.name for f in epath.Path(tmp_path).iterdir()) == ['metrics.jsonl']  # no temporary left


def test_append_on_cloud_storage_rewrites_the_object(tmp_path, monkeypatch):
    """Objects in a bucket cannot be appended to: the file is written again whole, with no temporary beside it."""
    monkeypatch.setattr(workdir, 'is_local', lambda p: False)
    p = workdir.path(tmp_path) / 'metrics.jsonl'
    workdir.append_line(p, 'a')
    workdir.append_line(p, 'b')
    assert p.read_text() == 'a\nb\n'
    assert [f.name for f in epath.Path(tmp_path).iterdir()] == ['metrics.jsonl']
