"""``--help`` explains every flag, from the comment beside its field's default."""

import dataclasses

import pytest

from kd_jax.cli.config import DistillConfig, TeacherConfig, build_parser, field_comments


@dataclasses.dataclass
class _Example:
    plain: int = 1  # on its own line
    # a block above,
    # over two lines
    blocked: float = 2.0
    silent: str = "x"

    def method(self) -> None:  # a comment that is not a field's
        pass


def test_a_field_comment_is_its_own_line_or_the_block_above():
    assert field_comments(_Example) == {"plain": "on its own line",
                                        "blocked": "a block above, over two lines",
                                        "silent": ""}


@pytest.mark.parametrize("cls", [TeacherConfig, DistillConfig])
def test_every_flag_says_what_it_does(cls):
    parser = build_parser(cls, "")
    documented = {a.dest: a.help for a in parser._actions}
    comments = field_comments(cls)
    for field in dataclasses.fields(cls):
        assert comments[field.name], f"{field.name} has no comment to show in --help"
        assert comments[field.name] in documented[field.name].replace("%%", "%")


def test_help_shows_the_default():
    help_text = build_parser(TeacherConfig, "").format_help()
    assert "passes over the training set (default 10)" in " ".join(help_text.split())
