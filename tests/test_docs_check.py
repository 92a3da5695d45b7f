"""scripts/docs_check.py on small markdown files: which blocks it finds and runs, and how it reports them."""

from __future__ import annotations

import pytest

from helpers import load_script

docs_check = load_script("docs_check")

MIXED = """# Title

```bash
echo one
```

```python title="x.py"
print("two")
```

```text
output, not run
```

```
no language
```

~~~sh
# needs: a CUDA GPU
nvidia-smi
~~~

1. In a list:

   ```shell
   if true; then
     echo indented
   fi
   ```

```console
$ kdpipe layers resnet20
```
"""


def write(folder, name: str, text: str):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def check(tmp_path, *args: str) -> int:
    return docs_check.main(["--root", str(tmp_path), *args])


def test_blocks_are_found_with_their_language_line_and_verdict():
    blocks = docs_check.fenced_blocks(MIXED, "doc.md")
    found = [(b.line, b.language, b.runner, b.verdict()[0]) for b in blocks]
    assert found == [
        (3, "bash", "bash", "run"),
        (7, "python", "python", "run"),
        (11, "text", None, "ignore"),
        (15, "", None, "ignore"),
        (19, "sh", "bash", "skip"),
        (26, "shell", "bash", "run"),
        (32, "console", None, "ignore"),
    ]
    assert blocks[4].needs == "a CUDA GPU"
    assert blocks[5].code == "if true; then\n  echo indented\nfi"  # the list item's indent removed, not the code's


def test_a_longer_fence_holds_a_shorter_one():
    blocks = docs_check.fenced_blocks("````markdown\n```bash\nfalse\n```\n````\n", "doc.md")
    assert [(b.language, b.code) for b in blocks] == [("markdown", "```bash\nfalse\n```")]


def test_a_prompt_in_a_runnable_block_is_refused_with_its_line(tmp_path, capsys):
    write(tmp_path, "doc.md", "text\n\n```bash\necho fine\n$ echo prompt\n```\n")
    assert check(tmp_path, "doc.md") == 1
    captured = capsys.readouterr()
    assert "Error: doc.md:3: the bash block is refused: line 5 starts with a prompt" in captured.err
    assert "0 run, 0 skipped (needs), 1 failed" in captured.out


def test_list_shows_each_block_and_runs_nothing(tmp_path, capsys):
    write(tmp_path, "doc.md", MIXED.replace("echo one", "touch made"))
    assert check(tmp_path, "--list", "doc.md") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "doc.md:3\tbash\trun"
    assert "doc.md:19\tsh\tskipped, needs: a CUDA GPU" in lines
    assert "doc.md:15\t-\tnot run (no language)" in lines
    assert not (tmp_path / "made").exists()


def test_a_failed_block_is_reported_and_the_rest_still_run(tmp_path, capsys):
    failing = "```bash\necho before\nexit 2\n```\n\n```bash\ntouch after\n```\n\n```bash\nfalse | cat\n```\n"
    write(tmp_path, "doc.md", failing)
    assert check(tmp_path, "doc.md") == 1
    captured = capsys.readouterr()
    assert "Error: doc.md:1: the bash block failed (exit 2)" in captured.err
    assert "before" in captured.err  # the block's output
    assert "Error: doc.md:10: the bash block failed (exit 1)" in captured.err  # pipefail
    assert (tmp_path / "after").exists()
    assert "3 run, 0 skipped (needs), 2 failed" in captured.out


def test_blocks_run_in_order_from_the_root_python_included(tmp_path, capsys):
    write(tmp_path, "README.md", "```python\nopen('made', 'w').write('from python')\n```\n")
    write(tmp_path, "docs/b.md", "```bash\ngrep -q 'from bash' made\n```\n")
    write(tmp_path, "docs/a.md", "```sh\ngrep -q 'from python' made\necho 'from bash' > made\n```\n")
    assert [p.name for p in docs_check.doc_files(tmp_path)] == ["README.md", "a.md", "b.md"]
    assert check(tmp_path) == 0
    out = capsys.readouterr().out
    assert out.index("README.md:1: python ok") < out.index("docs/a.md:1: bash ok") < out.index("docs/b.md:1: bash")
    assert "3 run, 0 skipped (needs), 0 failed" in out


def test_blocks_see_the_virtualenv_and_no_hub(tmp_path, monkeypatch):
    write(tmp_path, "doc.md", '```bash\ntest "$(command -v python)" -ef "$EXPECTED"\ntest "$HF_HUB_OFFLINE" = 1\n```\n')
    monkeypatch.setenv("EXPECTED", docs_check.sys.executable)
    assert check(tmp_path, "doc.md") == 0


def test_only_runs_the_named_block(tmp_path, capsys):
    write(tmp_path, "doc.md", "```bash\ntouch first\n```\n\n```bash\ntouch second\n```\n")
    assert check(tmp_path, "--only", "doc.md:6", "doc.md") == 0
    assert not (tmp_path / "first").exists() and (tmp_path / "second").exists()
    with pytest.raises(SystemExit, match="names no block"):
        check(tmp_path, "--only", "doc.md:4", "doc.md")


def test_a_block_past_its_timeout_is_killed(tmp_path, capsys):
    write(tmp_path, "doc.md", "```bash\nsleep 30 &\nwait\n```\n")
    assert check(tmp_path, "--timeout", "0.5", "doc.md") == 1
    assert "Error: doc.md:1: the bash block timed out after 0.5 s" in capsys.readouterr().err
