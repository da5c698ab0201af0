"""One-line messages from exceptions."""

from pixclass.errors import first_line


def test_first_line_skips_blank_lines_and_falls_back_to_the_type_name():
    assert first_line(ValueError("\n  \nbad shape (3, 4)\ndetails that follow")) == "bad shape (3, 4)"
    assert first_line(RuntimeError("one line")) == "one line"
    assert first_line(KeyError()) == "KeyError"
    assert first_line(OSError("  \n ")) == "OSError"
