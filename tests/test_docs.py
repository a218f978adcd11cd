"""README.zh-CN.md keeps step with README.md.

Prose is translated, so these checks compare what must stay identical across the two languages:
the shell commands in code blocks, the code blocks themselves (language and order), environment
variable names, the key column of every table (endpoints, variables, metrics, profiles), and
the lines of untagged blocks (sample output, the layout). Each check names what the Chinese
README lacks. Pure text processing: no imports from the project, milliseconds to run.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EN_PATH = ROOT / "README.md"
ZH_PATH = ROOT / "README.zh-CN.md"

# Commands a reader copies; a translated README must show them unchanged (comments aside).
COMMAND_PREFIXES = (
    "bentoml ",
    "curl ",
    "pip ",
    "python ",
    "./start_embed_server.sh",
    "docker ",
    "export ",
    "kubectl ",
    "eval ",
)
# `QWEN3_8B_EMBED_MODEL`, `EMBED_MAX_BATCH_TOKENS`, `BENTOML_HOME`, `<NAME>_QUANTIZATION`, ...
ENV_NAME = re.compile(r"<NAME>_[A-Z0-9_]+|\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b")
TRAILING_COMMENT = re.compile(r"\s+#\s.*$")
BACKTICKED = re.compile(r"`([^`]+)`")


def code_blocks(text: str) -> list[tuple[str, list[str]]]:
    """(language, lines) of every fenced block, in order."""
    blocks: list[tuple[str, list[str]]] = []
    current: list[str] | None = None
    language = ""
    for line in text.splitlines():
        if line.startswith("```"):
            if current is None:
                language, current = line[3:].strip(), []
            else:
                blocks.append((language, current))
                current = None
        elif current is not None:
            current.append(line)
    assert current is None, "unclosed code block"
    return blocks


def commands(text: str) -> list[str]:
    found = []
    for _, lines in code_blocks(text):
        for line in lines:
            line = " ".join(TRAILING_COMMENT.sub("", line).split())
            if line.startswith(COMMAND_PREFIXES) or re.match(r"[A-Z0-9_]+=\S+ (bentoml|docker) ", line):
                found.append(line)
    return found


def table_rows(text: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not re.fullmatch(r"\|[-| ]+\|?", line.strip()):
            rows.append(re.split(r"(?<!\\)\|", line.strip().strip("|")))
    return rows


@pytest.fixture(scope="module")
def en() -> str:
    return EN_PATH.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def zh() -> str:
    return ZH_PATH.read_text(encoding="utf-8")


def test_the_checks_have_something_to_check(en):
    # Guard against a parser that silently finds nothing (and so passes anything).
    assert len(commands(en)) >= 30
    assert len(code_blocks(en)) >= 20
    assert len(table_rows(en)) >= 60
    assert "EMBED_MAX_BATCH_TOKENS" in ENV_NAME.findall(en)


def test_every_shell_command_appears_in_the_chinese_readme(en, zh):
    zh_commands = set(commands(zh))
    missing = [command for command in commands(en) if command not in zh_commands]
    assert not missing, "README.zh-CN.md lacks these commands of README.md:\n" + "\n".join(missing)


def test_code_blocks_come_in_the_same_order(en, zh):
    en_languages = [language or "(plain)" for language, _ in code_blocks(en)]
    zh_languages = [language or "(plain)" for language, _ in code_blocks(zh)]
    assert zh_languages == en_languages, "the code blocks differ in number, language or order"


def test_untagged_blocks_match_line_by_line(en, zh):
    # Sample output and the file layout: the first word of each line (a path, a column) is not translated.
    def first_words(text):
        return [
            [line.split()[0] for line in lines if line.strip()] for language, lines in code_blocks(text) if not language
        ]

    assert first_words(zh) == first_words(en)


def test_every_environment_variable_appears_in_the_chinese_readme(en, zh):
    zh_names = set(ENV_NAME.findall(zh))
    missing = sorted(set(ENV_NAME.findall(en)) - zh_names)
    assert not missing, f"README.zh-CN.md never mentions {missing}"


def test_every_table_key_appears_in_a_chinese_table(en, zh):
    # The first column names the thing a row documents: an endpoint, a variable, a metric, a profile, a service.
    zh_keys = {key for row in table_rows(zh) for key in BACKTICKED.findall(row[0])}
    missing = [key for row in table_rows(en) for key in BACKTICKED.findall(row[0]) if key not in zh_keys]
    assert not missing, f"README.zh-CN.md's tables lack the rows for {missing}"


def test_every_endpoint_in_the_api_tables_appears_in_a_chinese_table(en, zh):
    def endpoints(text):
        return {
            token
            for row in table_rows(text)
            for cell in row
            for token in BACKTICKED.findall(cell)
            if re.fullmatch(r"/[\w./{}-]*", token)
        }

    missing = sorted(endpoints(en) - endpoints(zh))
    assert not missing, f"README.zh-CN.md's tables lack the endpoints {missing}"


def test_ci_runs_the_readmes_test_section(en):
    """.ci/run installs the system packages from the file the README's line reads, then runs the README's test
    command verbatim: CI passes only on what the README tells a new user to do."""
    [block] = [lines for _, lines in code_blocks(en) if "pip install -e '.[test]' && python -m pytest -q" in lines]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    packages_line, test_command = block
    assert "$(sed 's/#.*//' tests/system-packages.txt)" in packages_line
    assert any("$(sed 's/#.*//' tests/system-packages.txt)" in line for line in ci)
    assert test_command in ci
    assert ci[-1] == test_command  # the last thing CI does
