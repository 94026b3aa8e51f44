"""Ragged segment layouts shared by the op tests: 1-element and empty segments, odd sizes,
many tiny segments, and a segment that spans many vector widths."""

LAYOUTS = {
    "ragged": [1, 7, 0, 33, 2, 129, 1, 64],
    "one_element": [1],
    "many_tiny": [1, 2, 3] * 40,
    "long": [4099, 5, 1000, 0],
}


def offsets_of(lengths: list[int]) -> list[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def sampled_of(lengths: list[int]) -> list[tuple[int, int, int]]:
    """Every other segment (empty ones included), laid out back to back in a compact buffer."""
    offs = offsets_of(lengths)
    table, m = [], 0
    for s in range(0, len(lengths), 2):
        table.append((offs[s], lengths[s], m))
        m += lengths[s]
    return table
