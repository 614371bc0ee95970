"""``imglock info``: an image's format, size and backing chain, without any lock.

The JSON form uses qemu-img's key names wherever the meaning is the same,
so scripts written against ``qemu-img info --output=json`` read it as they
are; the text form reads like ``qemu-img info``.  Only headers are read, so
it works on images a running VM holds.
"""

from __future__ import annotations

from typing import Any

import click

from imglock.chain import open_chain
from imglock.cli.common import Voice, reported_errors, verbosity_options, write_output
from imglock.formats import FORMAT_NAMES, open_image
from imglock.text import visible_lines

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def human_size(size: int) -> str:
    """A size the way qemu-img prints it: three significant digits, binary units."""
    unit = 0
    # Switch units at 1000 (not 1024) so that at most three digits show.
    while unit < len(_UNITS) - 1 and size >= 1000 * (1 << (10 * unit)):
        unit += 1
    return f"{size / (1 << (10 * unit)):.3g} {_UNITS[unit]}"


def _scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _nested(data: dict[str, Any], indent: int) -> list[str]:
    lines: list[str] = []
    pad = " " * indent
    for key, value in data.items():
        label = key.replace("-", " ")
        if isinstance(value, dict):
            lines.append(f"{pad}{label}:")
            lines.extend(_nested(value, indent + 4))
        else:
            lines.append(f"{pad}{label}: {_scalar(value)}")
    return lines


def format_text(info: dict[str, Any]) -> str:
    """One image's ``info`` dictionary as ``qemu-img info`` lays it out."""
    lines = [
        f"image: {info['filename']}",
        f"file format: {info['format']}",
        f"virtual size: {human_size(info['virtual-size'])} ({info['virtual-size']} bytes)",
        f"disk size: {human_size(info['actual-size'])}",
    ]
    if info.get("encrypted"):
        lines.append("encrypted: yes")
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if "backing-filename" in info:
        name, full = info["backing-filename"], info["full-backing-filename"]
        actual = f" (actual path: {full})" if full != name else ""
        lines.append(f"backing file: {name}{actual}")
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}")
    if info.get("snapshot-count"):
        lines.append(f"snapshot count: {info['snapshot-count']}")
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    specific = info.get("format-specific")
    if specific:
        lines.append("Format specific information:")
        lines.extend(_nested(specific["data"], 4))
    # File names come from image headers, which anyone who writes the image
    # controls: a newline or a terminal escape in one is shown, never obeyed.
    return visible_lines(lines)


@click.command(
    "info",
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON with qemu-img's key names.")
@click.option(
    "--format",
    "image_format",
    type=click.Choice(["auto", *FORMAT_NAMES]),
    default="auto",
    show_default=True,
    help="The top image's format; auto probes it like QEMU.",
)
@click.option(
    "--backing-chain",
    is_flag=True,
    help="Describe every image of the backing chain, top first.",
)
@verbosity_options
@click.argument("image", type=click.Path(dir_okay=True, readable=False, path_type=str))
def info(as_json: bool, image_format: str, backing_chain: bool, image: str) -> None:
    """Show IMAGE's format, sizes and backing file, taking no lock.

    Exit status: 0 when the image was read, 65 for a malformed image or an
    unusable backing chain, 66 when the image cannot be opened, 74 for a
    read error.
    """
    with reported_errors():
        if backing_chain:
            with open_chain(image, image_format) as chain:
                infos = [img.driver.info(img) for img in chain.backing_chain]
            output: dict[str, Any] | list[dict[str, Any]] = infos
        else:
            opened = open_image(image, image_format)
            try:
                how = "probed" if image_format == "auto" else "as named"
                Voice.current().note(f"{image}: format {opened.format} ({how})")
                output = opened.driver.info(opened)
            finally:
                opened.close()
    if as_json:
        # The json package costs about 2 ms to load, a twentieth of `import
        # click`, and only --json needs it: loaded here, where JSON is written.
        import json

        text = json.dumps(output, indent=4)
    elif isinstance(output, list):
        text = "\n\n".join(format_text(item) for item in output)
    else:
        text = format_text(output)
    # Escaped (format_text), so valid UTF-8 whatever the locale.
    write_output(text)
