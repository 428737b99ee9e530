"""MkDocs hook: the notebooks live in notebooks/ (executed by the tests); the site renders those
files as they are, under notebooks/, without copying them into docs/pages."""

from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@event_priority(100)  # before mkdocs-jupyter, which turns .ipynb files into pages
def on_files(files, config):
    for nb in sorted(NOTEBOOKS.glob("*.ipynb")):
        files.append(File.generated(config, f"notebooks/{nb.name}", abs_src_path=str(nb)))
    return files


README = NOTEBOOKS.parent / "README.md"


def on_page_markdown(markdown, page, config, files):
    """The getting-started page is the README itself (one text, never two that drift apart),
    its links to docs/pages/... made relative to the site."""
    if page.file.src_uri == "index.md":
        return README.read_text().replace("](docs/pages/", "](")
    return markdown
