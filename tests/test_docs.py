"""The README and docs/: every relative link resolves (files, and #anchors to a heading of the target by GitHub's
rules), every docs page is listed in docs/index.md, and the README stays a front door (at most 250 lines)."""
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / 'README.md', REPO / 'benchmarks' / 'RESULTS.md', *sorted((REPO / 'docs').glob('*.md'))]
README_MAX_LINES = 250

_FENCE = re.compile(r'^(```|~~~).*?^\1[ \t]*$', re.M | re.S)
_CODE_SPAN = re.compile(r'(`+)(?!`).+?(?<!`)\1(?!`)', re.S)
_LINK = re.compile(r'!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')
_HEADING = re.compile(r'^ {0,3}(#{1,6})[ \t]+(.+?)[ \t#]*$', re.M)


def _prose(text: str) -> str:
    """Markdown without fenced code blocks and code spans, where brackets are not links."""
    return _CODE_SPAN.sub('', _FENCE.sub('', text))


def github_slug(heading: str) -> str:
    """GitHub's heading anchor: markup reduced to its text, lower case, every character that is not a letter,
    digit, '_', '-' or space dropped, spaces turned into '-'."""
    text = re.sub(r'!?\[([^\]]*)\]\([^)]*\)', r'\1', heading)  # links and images: their text
    text = re.sub(r'<[^>]+>', '', text).replace('`', '').lower()
    return re.sub(r'[^\w\- ]', '', text).replace(' ', '-')


def anchors(page: Path) -> set:
    """Anchors of a page's headings; repeats get -1, -2, ... as on GitHub."""
    seen, out = {}, set()
    for _, title in _HEADING.findall(_FENCE.sub('', page.read_text(encoding='utf-8'))):
        slug = github_slug(title)
        out.add(f'{slug}-{seen[slug]}' if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return out


def relative_links(page: Path):
    for target in _LINK.findall(_prose(page.read_text(encoding='utf-8'))):
        if not re.match(r'[a-z][a-z0-9+.-]*:', target, re.I):  # http:, https:, mailto: ... are not checked
            yield target


def test_github_slug_follows_githubs_rules():
    """Expected anchors worked out by hand from GitHub's rules."""
    assert github_slug('Faithfulness to the original') == 'faithfulness-to-the-original'
    assert github_slug('`--malloc`: glibc and large activations') == '--malloc-glibc-and-large-activations'
    assert github_slug('Runs L–Q: C++ forwards, and malloc (2026-11-25)') == 'runs-lq-c-forwards-and-malloc-2026-11-25'
    assert github_slug('CPU: rsmamba_base, 224 px') == 'cpu-rsmamba_base-224-px'
    assert github_slug('See [the hub](hub.md) **now**') == 'see-the-hub-now'


def test_link_finder_skips_code():
    page = '[a](x.md) `[b](y.md)` ![c](img/z.png)\n```\n[d](w.md)\n```\n[e](https://example.com) [f](#top)\n'
    found = [t for t in _LINK.findall(_prose(page)) if not t.startswith('https:')]
    assert found == ['x.md', 'img/z.png', '#top']


@pytest.mark.parametrize('page', PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition('#')
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f'{target}: no file {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest}')
        elif anchor and dest.suffix == '.md' and anchor not in anchors(dest):
            broken.append(f'{target}: no heading with anchor #{anchor} in {dest.relative_to(REPO)}')
    assert not broken, f'{page.relative_to(REPO)} has broken links:\n' + '\n'.join(broken)


def test_every_docs_page_is_listed_in_the_index():
    index = REPO / 'docs' / 'index.md'
    listed = {(index.parent / t.partition('#')[0]).resolve() for t in relative_links(index)}
    missing = [p.name for p in (REPO / 'docs').glob('*.md') if p != index and p.resolve() not in listed]
    assert not missing, f'docs/index.md does not list {missing}'


def test_readme_is_a_front_door():
    lines = (REPO / 'README.md').read_text(encoding='utf-8').splitlines()
    assert len(lines) <= README_MAX_LINES, f'README.md has {len(lines)} lines; move detail into docs/'


def test_readme_install_and_test_commands_are_what_ci_runs():
    readme = (REPO / 'README.md').read_text(encoding='utf-8')
    ci = [line for line in (REPO / '.ci' / 'run').read_text().splitlines() if line.startswith('python3 ')]
    assert ci == ['python3 -m pip install -e ".[test]"', 'python3 -m pytest']
    assert f'```bash\n{ci[0]}\n{ci[1]}\n```' in readme
