"""The types of the scripts' flags (utils.get_parser): each checks its value when it is parsed, so that a
bad setting is one line and exit 2 before anything is built."""
import argparse
import math
import re


def _checked(kind, ok, rule):
    """An argparse type that also checks the value, so bad settings fail before anything is built."""
    def parse(text):
        try:
            value = kind(text)
        except (ValueError, OverflowError):
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"{rule}, got {text!r}")
        return value
    return parse


def finite(ok, rule):
    """An argparse type for a float that is finite (nan and ±inf never make sense here) and passes ok."""
    return _checked(float, lambda x: math.isfinite(x) and ok(x), rule)


# torch.manual_seed takes seeds below 2**64; the seed + rank (and the sampler's seed + epoch) stay below it.
# Counts stay below it too: torch, Python's len() and the data loaders take no larger integer
SEED_LIMIT = 2 ** 63
COUNT = _checked(int, lambda n: 1 <= n < SEED_LIMIT, "must be an integer ≥ 1 and below 2**63")
NATURAL = _checked(int, lambda n: 0 <= n < SEED_LIMIT, "must be an integer ≥ 0 and below 2**63")
SEED = _checked(int, lambda n: 0 <= n < SEED_LIMIT, "must be an integer from 0 to 2**63 - 1")
# an empty path is no path: an unset $CKPT in a job script must not mean "no flag" (a fresh start)
PATH = _checked(str, lambda s: s.strip() != "", "must name a path, not be empty or blank")


def _list_problem(text):
    """What is wrong with `text` as a list of whole numbers from 1 to 2**63 - 1 in increasing order,
    separated by commas (None if nothing): each form a list can be malformed in is named, so that no
    list flag runs with numbers the user did not write."""
    if not text.strip():
        return "the list is empty"
    if any(c.isspace() for c in text):
        return "it holds a space"
    items = text.split(",")
    if items[0] == "" or items[-1] == "":
        return f"it {'starts' if items[0] == '' else 'ends'} with a comma"
    if "" in items:
        return "it has an empty item between two commas"
    values = []
    for item in items:
        if not re.fullmatch("[0-9]+", item):  # int() would also take "+7", " 7", "7_0" and non-ASCII digits
            if re.fullmatch("-[0-9]+", item):
                return f"{item} is below 1"
            if re.fullmatch("[+][0-9]+", item):
                return f"{item} has a sign"
            if item.isdigit():
                return f"{item!r} is not written in the digits 0-9"
            return f"{item!r} is not a whole number"
        values.append(int(item))
        if values[-1] < 1:
            return f"{item} is below 1"
        if values[-1] >= SEED_LIMIT:
            return f"{item} is beyond 2**63 - 1"
        if values[-1] in values[:-1]:
            return f"{item} appears twice"
        if len(values) > 1 and values[-1] < values[-2]:
            return f"{item} comes after {values[-2]}: not in increasing order"
    return None


def _int_list(what, example):
    """An argparse type for a list flag: a tuple of whole numbers ≥ 1 in increasing order."""
    def parse(text):
        problem = _list_problem(text)
        if problem:
            raise argparse.ArgumentTypeError(f"must be {what} ≥ 1 in increasing order, separated by commas without "
                                             f"spaces, like {example}: {problem}, got {text!r}")
        return tuple(int(item) for item in text.split(","))
    return parse


EPOCHS = _int_list("epochs", "70,100")
STEPS = _int_list("step counts", "10,20,50,100")


class SeedAll(argparse.Action):
    """--seed S sets the CUDA seed too: the authors' separate CUDA seed (DEFAULTS' cuda_seed) is the default
    alone, or every --seed would draw the same spike trains and dropout masks on a GPU."""

    def __call__(self, parser, namespace, value, option_string=None):
        namespace.seed = namespace.cuda_seed = value
