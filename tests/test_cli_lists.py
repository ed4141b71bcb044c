"""The list flags (--lr-steps, --time-sweep): every malformed list is one line on stderr naming the flag
and what is wrong, and exit 2, before anything is built; a well-formed one parses as written."""
import pytest

import utils

LIST_FLAGS = {"--lr-steps": "lr_steps", "--time-sweep": "time_sweep"}

# (value, what the line says is wrong)
MALFORMED = [
    ("", "the list is empty"),
    (" ", "the list is empty"),
    (",", "it starts with a comma"),
    (",,,", "it starts with a comma"),
    (",70", "it starts with a comma"),
    ("70,", "it ends with a comma"),
    ("70,,100", "it has an empty item between two commas"),
    ("70, 100", "it holds a space"),
    (" 70", "it holds a space"),
    ("70 ", "it holds a space"),
    ("70\t,100", "it holds a space"),
    ("70;100", "'70;100' is not a whole number"),
    ("70 100", "it holds a space"),
    ("abc", "'abc' is not a whole number"),
    ("70,x", "'x' is not a whole number"),
    ("70.5", "'70.5' is not a whole number"),
    ("70.0", "'70.0' is not a whole number"),
    ("1e2", "'1e2' is not a whole number"),
    ("0x10", "'0x10' is not a whole number"),
    ("7_0", "'7_0' is not a whole number"),  # int() takes it, as 70
    ("inf", "'inf' is not a whole number"),
    ("nan", "'nan' is not a whole number"),
    ("+70", "+70 has a sign"),
    ("70,+100", "+100 has a sign"),
    ("-5", "-5 is below 1"),
    ("0", "0 is below 1"),
    ("00", "00 is below 1"),
    ("70,0", "0 is below 1"),
    ("−5", "'−5' is not a whole number"),  # a unicode minus
    ("٧٠", "'٧٠' is not written in the digits 0-9"),  # Arabic-Indic 70, which int() takes
    ("７０", "'７０' is not written in the digits 0-9"),  # full-width 70
    ("²", "'²' is not written in the digits 0-9"),
    ("1,1", "1 appears twice"),
    ("70,100,70", "70 appears twice"),
    ("100,70", "70 comes after 100: not in increasing order"),
    ("10,50,20", "20 comes after 50: not in increasing order"),
    (str(2 ** 63), f"{2 ** 63} is beyond 2**63 - 1"),
    ("70," + "9" * 30, f"{'9' * 30} is beyond 2**63 - 1"),
]


def parse(flag, value):
    import mnist_LeNet
    return utils.get_parser("", mnist_LeNet.DEFAULTS).parse_args([f"{flag}={value}"])  # "=": "-5" stays a value


@pytest.mark.parametrize("value, problem", MALFORMED)
@pytest.mark.parametrize("flag", LIST_FLAGS)
def test_a_malformed_list_is_one_line_naming_the_flag_and_the_fault(flag, value, problem, capsys):
    with pytest.raises(SystemExit) as e:
        parse(flag, value)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert f"error: argument {flag}: must be " in err and "in increasing order" in err, err
    assert f": {problem}, got {value!r}" in err, err


@pytest.mark.parametrize("flag", LIST_FLAGS)
@pytest.mark.parametrize("value, parsed", [("70", (70,)), ("70,100,125", (70, 100, 125)), ("1,2", (1, 2)),
                                           ("070,100", (70, 100)), (str(2 ** 63 - 1), (2 ** 63 - 1,))])
def test_a_well_formed_list_parses_as_written(flag, value, parsed):
    assert getattr(parse(flag, value), LIST_FLAGS[flag]) == parsed


def test_the_defaults_parse():
    import cifar10_VGG9
    args = utils.get_parser("", cifar10_VGG9.DEFAULTS).parse_args([])
    assert args.lr_steps == (70, 100, 125) and args.time_sweep is None


def test_a_malformed_list_stops_a_script_before_any_work(run_script, clean_error):
    clean_error(run_script("mnist_LeNet.py", "--lr-steps", "70,,100", "--synthetic"),
                "--lr-steps", "an empty item between two commas", code=2)
