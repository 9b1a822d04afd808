"""Docs that cannot drift: every documented command parses with its tool's own parser, every `--config.X=...` names a
real field with a valid value, runnable Python blocks run, links resolve, and the generated tables are current."""

import argparse
import os
import pathlib
import re
import runpy
import shlex
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = [REPO / 'README.md', *sorted((REPO / 'docs').glob('*.md')), REPO / 'benchmarks' / 'README.md',
        REPO / 'experiments' / 'README.md']
DOCS = [d for d in DOCS if d.exists()]


def fenced_blocks(path: pathlib.Path) -> list[tuple[str, str, int]]:
    """(info string, body, line number) of every fenced block."""
    blocks, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        match = re.match(r'^```(\S*.*)$', lines[i].strip())
        if match and lines[i].strip() != '```':
            start, body = i + 1, []
            i += 1
            while i < len(lines) and lines[i].strip() != '```':
                body.append(lines[i])
                i += 1
            blocks.append((match.group(1).strip(), '\n'.join(body), start))
        i += 1
    return blocks


def commands() -> list[tuple[str, str]]:
    """('file:line', command) of every `python -m vit_jax.<tool>` / `python experiments/...` line in bash blocks."""
    found = []
    for path in DOCS:
        for info, body, line in fenced_blocks(path):
            if info.split()[:1] != ['bash']:
                continue
            for offset, command in enumerate(body.replace('\\\n', ' ').splitlines()):
                command = re.sub(r'\s+#.*$', '', command.strip())
                command = re.sub(r'\[[^\]]*\]', '', command)  # [--optional ...] as the usage line shows it
                command = re.sub(r'^\S+=\S+\s+', '', command)  # ENV=value before the command
                if re.match(r'^(\S*/)?python3? (-m vit_jax\.\w+|experiments/\S+\.py)', command):
                    found.append((f'{path.relative_to(REPO)}:{line + offset}', command))
    return found


class Parsed(Exception):
    """Raised in place of running the work, once a tool's parser accepted the command line."""


@pytest.fixture
def stop_after_parsing(monkeypatch):
    original_parse_known = argparse.ArgumentParser.parse_known_args

    def parse_known_args(self, args=None, namespace=None):
        result = original_parse_known(self, args, namespace)
        raise Parsed(result)
    monkeypatch.setattr(argparse.ArgumentParser, 'parse_known_args', parse_known_args)
    monkeypatch.setenv('VIT_JAX_MALLOC', '0')  # no re-execution of the process for glibc's tunables


def check_config_flags(argv: list[str], main_flags: bool = False) -> None:
    """--config FILE and --config.X=V through the same locked ml_collections config flag vit_jax.main defines (in a
    FlagValues of its own), then validate_config; ``main_flags``: every other flag must be one of vit_jax.main's."""
    from absl import flags
    from ml_collections import config_flags
    from vit_jax.train.validate import validate_config
    config_args, others, i = [], [], 0
    while i < len(argv):
        token = argv[i]
        takes_value = '=' not in token and i + 1 < len(argv) and not argv[i + 1].startswith('--')
        if token == '--config' or token.startswith('--config.'):
            config_args.append(f'{token}={argv[i + 1]}' if takes_value else token)
            i += 2 if takes_value else 1
            continue
        if token.startswith('--'):  # another flag (its value, the next token, matches neither branch)
            others.append(token[2:].split('=')[0])
        i += 1
    if main_flags:
        import vit_jax.main
        known = set(vit_jax.main.FLAGS)
        for name in others:
            assert name in known or (name.startswith('no') and name[2:] in known), f'--{name} is not a flag of main'
    if not config_args:
        return
    values = flags.FlagValues()
    config_flags.DEFINE_config_file('config', None, 'config', flag_values=values, lock_config=True)
    saved, sys.argv = sys.argv, ['main', *config_args]  # the config flag reads its overrides from sys.argv
    try:
        values(sys.argv)
    finally:
        sys.argv = saved
    validate_config(values.config)


def forget_the_imported_main(module: str, monkeypatch) -> None:
    """Runs ``module`` as `python -m` does, not as a second copy of the code an earlier test imported (runpy warns):
    its ``__main__`` (a package's, a module's own code) leaves ``sys.modules`` for the test. A package stays: runpy
    imports it, and a fresh copy would replace the one other tests patch."""
    main = f'{module}.__main__' if hasattr(sys.modules.get(module), '__path__') else module
    monkeypatch.delitem(sys.modules, main, raising=False)


@pytest.mark.parametrize('where, command', commands() or [('none', '')])
def test_documented_commands_parse(where, command, stop_after_parsing, monkeypatch):
    assert command, 'no documented commands found'
    argv = shlex.split(command)
    monkeypatch.chdir(REPO)
    if argv[1] == '-m':
        module, args = argv[2], argv[3:]
    else:
        module, args = None, argv[2:]
    if module in ('vit_jax.main', 'vit_jax.aot'):
        check_config_flags(args, main_flags=module == 'vit_jax.main')
        if module == 'vit_jax.main':
            return
        args = [a for a in args if not a.startswith('--config.')]
    monkeypatch.setattr(sys, 'argv', [argv[1] if module is None else module, *args])
    try:
        if module is None:
            runpy.run_path(str(REPO / argv[1]), run_name='__main__')
        else:
            forget_the_imported_main(module, monkeypatch)
            runpy.run_module(module, run_name='__main__', alter_sys=True)
    except Parsed:
        return
    except SystemExit as e:
        pytest.fail(f'{where}: `{command}` was refused by its parser (exit {e.code})')
    pytest.fail(f'{where}: `{command}` ran without parsing any arguments')


def test_the_parse_check_catches_a_bad_flag_and_a_bad_field(stop_after_parsing, monkeypatch):
    """The check above can fail: a renamed flag, a misspelt config field and an out-of-range value are refused."""
    monkeypatch.setattr(sys, 'argv', ['vit_jax.export', '--no-such-flag'])
    forget_the_imported_main('vit_jax.export', monkeypatch)
    with pytest.raises(SystemExit):
        runpy.run_module('vit_jax.export', run_name='__main__', alter_sys=True)
    with pytest.raises(Exception, match='learnig_rate'):
        check_config_flags(['--config', 'configs/quickstart.py', '--config.optimizer.learnig_rate=1'])
    with pytest.raises(ValueError, match='batch_size'):
        check_config_flags(['--config', 'configs/quickstart.py', '--config.batch_size=0'])


@pytest.mark.parametrize('path', DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_links_and_images_resolve(path):
    text = path.read_text()
    for target in re.findall(r'!?\[[^\]]*\]\(([^)\s]+)\)', text):
        if re.match(r'^(https?:|mailto:|#)', target):
            continue
        resolved = (path.parent / target.split('#')[0]).resolve()
        assert resolved.exists(), f'{path.relative_to(REPO)}: {target} does not exist'


def runnable_blocks() -> list[tuple[str, str]]:
    return [(f'{p.relative_to(REPO)}:{line}', body) for p in DOCS for info, body, line in fenced_blocks(p)
            if info.split()[:2] == ['python', 'runnable']]


@pytest.mark.parametrize('where, code', runnable_blocks() or [('none', '')])
def test_runnable_python_blocks_run(where, code, tmp_path):
    if not code:
        pytest.skip('no block marked ```python runnable')
    run = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**os.environ, 'PYTHONPATH': str(REPO)})
    assert run.returncode == 0, f'{where}:\n{run.stderr[-3000:]}'


def _table_in(text: str, header: str) -> str | None:
    start = text.find(header)
    if start < 0:
        return None
    lines = []
    for line in text[start:].splitlines():
        if not line.startswith('|'):
            break
        lines.append(line)
    return '\n'.join(lines)


def test_model_and_recipe_tables_are_what_the_code_prints():
    from vit_jax.models.summary import model_table
    from vit_jax import recipes
    models = model_table(markdown=True).strip()
    found = False
    for path in DOCS:
        table = _table_in(path.read_text(), models.splitlines()[0])
        if table is not None:
            found = True
            assert table == models, f'{path.relative_to(REPO)}: rerun python -m vit_jax.models --markdown'
    assert found, 'no document holds the model table'
    recipe_report = recipes.report(markdown=True).strip()
    found = False
    for path in DOCS:
        text = path.read_text()
        heading = re.search(r'^### configs/', text, re.M)
        if heading:
            found = True
            assert text[heading.start():].rstrip('\n') == recipe_report, (
                f'{path.relative_to(REPO)}: rerun python -m vit_jax.recipes --markdown')
    assert found, 'no document holds the recipes report'


def test_config_reference_is_current_and_complete():
    from vit_jax.train import config as config_lib, config_reference
    text = (REPO / 'docs' / 'config.md').read_text()
    assert text == config_reference.markdown(), 'rerun: python -m vit_jax.train.config_reference > docs/config.md'
    for name, _, _ in config_reference.leaves(config_lib.base_config()):
        assert re.search(rf'^\| `{re.escape(name)}` \|', text, re.M), f'config.{name} is missing from docs/config.md'


def test_version_is_printed():
    import importlib.metadata
    run = subprocess.run([sys.executable, '-m', 'vit_jax.main', '--version'], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == f'vit_jax {importlib.metadata.version("vit_jax")}'
