"""Edit generated sections of the project's Markdown documents."""


def replace_section(document: str, heading: str, section: str) -> str:
    """Replace the section that starts with `heading`, or append it.

    The section runs to the next heading of the same or a higher level.
    """
    level = heading.split(" ", 1)[0]
    lines = document.splitlines(keepends=True)
    start = next(
        (i for i, line in enumerate(lines) if line.rstrip() == heading),
        None,
    )
    if start is None:
        separator = "\n" if document and not document.endswith("\n\n") else ""
        return document + separator + section
    end = start + 1
    while end < len(lines):
        marker = lines[end].split(" ", 1)[0]
        if set(marker) == {"#"} and len(marker) <= len(level):
            break
        end += 1
    tail = "".join(lines[end:])

    return "".join(lines[:start]) + section + ("\n" + tail if tail else "")
