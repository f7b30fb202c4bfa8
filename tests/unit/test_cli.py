"""The `flint` command's parser, without a region: a noun alone shows its actions."""

import pytest

from flint.cli import main


@pytest.mark.parametrize("noun", ["cluster", "function", "alias", "events", "tenant", "tenant keys", "counting",
                                  "chaos", "placement"])
def test_a_noun_without_an_action_prints_its_actions_and_is_a_usage_error(noun, capsys):
    assert main(noun.split()) == 2
    assert capsys.readouterr().out.startswith(f"usage: flint {noun} [-h] ACTION ...")


def test_no_command_prints_the_commands_and_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out
