"""Rules: the text format, matching, plans, errors; a property test against a
regex reference matcher."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastckpt
from fastckpt import CheckpointError, Rules, as_rules
from fastckpt.planning.mapping import Assignment, RowSelection
from fastckpt.planning.rules import select
from tests.conftest import tiny_hf_config


def pairs(plan):
    return {a.target: a.source for a in plan.assignments}


# -- patterns ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "key", "targets"),
    [
        ("module.{rest*} -> {rest*}", "module.bert.encoder.w", ("bert.encoder.w",)),
        ("{rest*} -> bert.{rest*}", "encoder.w", ("bert.encoder.w",)),
        ("{p*}.gamma -> {p*}.weight", "a.LayerNorm.gamma", ("a.LayerNorm.weight",)),
        ("{p*}.gamma -> {p*}.weight", "gamma", ("weight",)),  # empty capture drops its dot
        ("a.{x*}.b -> c.{x*}.d", "a.b", ("c.d",)),
        ("a.{x*}.b -> c.{x*}.d", "a.1.2.b", ("c.1.2.d",)),
        (
            "enc.layers.{i}.ffn.{w}.{p} -> enc.layers.{i}.{w}.{p}",
            "enc.layers.7.ffn.fc1.bias",
            ("enc.layers.7.fc1.bias",),
        ),
        ("x.* -> y", "x.anything", ("y",)),
        ("x.** -> y", "x", ("y",)),
        ("t.w -> a.w, b.w", "t.w", ("a.w", "b.w")),
        ("{a}.{b} -> {b}.{a}", "left.right", ("right.left",)),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_pattern_matches(rule, key, targets):
    (m,) = Rules.parse(rule).match([key])
    assert m is not None
    assert m.rule.text == rule
    assert m.targets == targets


@pytest.mark.parametrize(
    ("rule", "key"),
    [
        ("module.{rest*} -> {rest*}", "bert.module.x"),
        ("x.* -> y", "x"),  # `*` is exactly one segment
        ("x.* -> y", "x.a.b"),
        ("a.{i}.b -> c", "a.b"),
        ("a.b -> c", "a.b.c"),
        ("a.b -> c", "a"),
    ],
)
def test_pattern_does_not_match(rule, key):
    assert Rules.parse(rule).match([key]) == [None]


def test_many_captures_are_greedy_leftmost_first():
    (m,) = Rules.parse("{a*}.x.{b*} -> {b*}.y.{a*}").match(["x.x.x"])
    assert m is not None and m.targets == ("y.x.x",)  # a="x.x", b=""


def test_first_matching_rule_wins_in_file_order():
    r = Rules.parse("a.{x} -> first.{x}\na.b -> second\n{k*} -> third.{k*}\n")
    got = r.match(["a.b", "a.c", "z", "a.b.c"])
    assert [m.targets if m else None for m in got] == [
        ("first.b",),
        ("first.c",),
        ("third.z",),
        ("third.a.b.c",),
    ]
    assert [m.rule.line if m else None for m in got] == [1, 1, 3, 3]


def test_ignore_takes_part_in_first_match():
    r = Rules.parse("ignore cls.**\n{rest*} -> bert.{rest*}\n")
    plan = r.plan(["cls.pred.bias", "enc.w"], ["bert.enc.w"])
    assert plan.ignored_sources == ["cls.pred.bias"]
    assert pairs(plan) == {"bert.enc.w": "enc.w"}


# -- plans -------------------------------------------------------------------


def test_plan_identity_for_unmatched_keys_and_rule_attributes():
    r = Rules.parse(
        "emb.weight -> enc.emb.weight, dec.out.weight rows[:1001] dtype=bf16\n"
        "ignore-target **.version\n"
    )
    plan = r.plan(
        ["emb.weight", "enc.fc.weight", "leftover"],
        ["enc.emb.weight", "enc.fc.weight", "dec.out.weight", "enc.version", "dec.missing"],
    )
    rule = "emb.weight -> enc.emb.weight, dec.out.weight rows[:1001] dtype=bf16"
    rows = RowSelection(start=0, stop=1001)
    assert plan.assignments == [
        Assignment("enc.emb.weight", "emb.weight", rule, rows, torch.bfloat16),
        Assignment("enc.fc.weight", "enc.fc.weight"),
        Assignment("dec.out.weight", "emb.weight", rule, rows, torch.bfloat16),
    ]
    # `leftover` has no target of its name: left for the loader to call unexpected.
    assert plan.ignored_sources == []
    # dec.missing stays missing: no rule covers it.
    assert plan.ignored_targets == ["enc.version"]
    assert plan.unused_rules == []


def test_rule_targets_missing_from_the_model_stay_in_the_plan():
    plan = Rules.parse("a -> typo_name").plan(["a"], ["real_name"])
    assert plan.assignments == [Assignment("typo_name", "a", "a -> typo_name")]


def test_unused_rules_are_listed():
    r = Rules.parse("nothing.here -> x\nignore cls.**\nignore-target **.version\na -> b\n")
    plan = r.plan(["a"], ["b"])
    assert plan.unused_rules == ["nothing.here -> x", "ignore cls.**", "ignore-target **.version"]


def test_rule_shadowed_by_an_earlier_rule_is_unused():
    plan = Rules.parse("module.{r*} -> {r*}\nmodule.{p*}.gamma -> {p*}.weight\n").plan(
        ["module.ln.gamma"], ["ln.gamma"]
    )
    assert plan.unused_rules == ["module.{p*}.gamma -> {p*}.weight"]


def test_two_sources_for_one_target_is_an_error_naming_both():
    r = Rules.parse("# header\nenc.ffn.fc1.weight -> enc.fc1.weight\n", source="port.rules")
    with pytest.raises(CheckpointError) as e:
        r.plan(["enc.fc1.weight", "enc.ffn.fc1.weight"], ["enc.fc1.weight"])
    assert str(e.value) == (
        "port.rules: target 'enc.fc1.weight' has two sources: 'enc.fc1.weight' (same name) and "
        "'enc.ffn.fc1.weight' (line 2: enc.ffn.fc1.weight -> enc.fc1.weight); "
        "mark the rule whose source should win with 'wins'"
    )


def test_two_sources_from_one_capture_rule_is_an_error():
    r = Rules.parse("{a}.{b} -> {a}")
    with pytest.raises(CheckpointError, match=r"target 'x' has two sources: 'x\.1' \(line 1: "):
        r.plan(["x.1", "x.2"], ["x"])


def test_wins_picks_the_source_and_ignores_the_other():
    r = Rules.parse("enc.ffn.fc1.weight -> enc.fc1.weight wins\n")
    plan = r.plan(["enc.fc1.weight", "enc.ffn.fc1.weight"], ["enc.fc1.weight"])
    assert pairs(plan) == {"enc.fc1.weight": "enc.ffn.fc1.weight"}
    assert plan.ignored_sources == ["enc.fc1.weight"]


def test_two_winners_is_still_an_error():
    r = Rules.parse("a -> t wins\nb -> t wins\n")
    with pytest.raises(CheckpointError, match="both rules are marked 'wins'"):
        r.plan(["a", "b"], ["t"])


def test_ignore_target_does_not_hide_a_loaded_target():
    plan = Rules.parse("ignore-target **.version").plan(["enc.version"], ["enc.version"])
    assert pairs(plan) == {"enc.version": "enc.version"}
    assert plan.ignored_targets == [] and plan.unused_rules == []


def test_rule_mapping_to_an_empty_name_is_an_error():
    with pytest.raises(CheckpointError) as e:
        Rules.parse("module.{rest*} -> {rest*}", source="r.txt").plan(["module"], [])
    assert (
        str(e.value) == "r.txt: line 1: module.{rest*} -> {rest*}: maps 'module' to an empty name"
    )


def test_rows_from_an_index_file_relative_to_the_rules_file(tmp_path: Path):
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "vocab.txt").write_text("5\n0\n\n3\n")
    (tmp_path / "port.rules").write_text("emb -> emb rows[@maps/vocab.txt]\n")
    r = Rules.from_file(tmp_path / "port.rules")
    (a,) = r.plan(["emb"], ["emb"]).assignments
    assert a.rows == RowSelection(index=(5, 0, 3))
    assert r.rules[0].rows_file == "maps/vocab.txt"
    assert str(r) == "emb -> emb rows[@maps/vocab.txt]\n"


def test_rows_file_errors(tmp_path: Path):
    (tmp_path / "bad.txt").write_text("1\nx2\n")
    with pytest.raises(CheckpointError) as e:
        Rules.parse("a -> b rows[@bad.txt]", source="r.rules", base_dir=tmp_path)
    assert (
        str(e.value) == f"r.rules:1:8: rows file {tmp_path / 'bad.txt'}:2: 'x2' is not a row number"
    )
    with pytest.raises(CheckpointError) as e:
        Rules.parse("a -> b rows[@nope.txt]", source="r.rules", base_dir=tmp_path)
    assert str(e.value) == (
        f"r.rules:1:8: cannot read rows file {tmp_path / 'nope.txt'}: No such file or directory"
    )


@pytest.mark.parametrize(
    ("attr", "selection", "rows_of_40"),
    [
        ("rows[:30]", RowSelection(0, 30), 30),
        ("rows[10:]", RowSelection(10, None), 30),
        ("rows[10:20]", RowSelection(10, 20), 10),
        ("rows[:]", RowSelection(0, None), 40),
    ],
)
def test_row_ranges(attr, selection, rows_of_40):
    (a,) = Rules.parse(f"a -> b {attr}").plan(["a"], ["b"]).assignments
    assert a.rows == selection
    assert a.rows.rows(40) == rows_of_40


@pytest.mark.parametrize(
    ("spelling", "dtype"),
    [
        ("bf16", torch.bfloat16),
        ("fp16", torch.float16),
        ("half", torch.float16),
        ("fp32", torch.float32),
        ("F32", torch.float32),
        ("float64", torch.float64),
        ("int8", torch.int8),
        ("float8_e4m3fn", torch.float8_e4m3fn),
    ],
)
def test_dtype_spellings(spelling, dtype):
    assert Rules.parse(f"a -> b dtype={spelling}").rules[0].dtype == dtype


def test_freeze_patterns_and_select():
    r = Rules.parse("freeze bert.**\nunfreeze bert.encoder.layer.11.**\nfreeze linear.0.*\n")
    assert r.freeze_patterns == ["bert.**", "linear.0.*"]
    assert r.unfreeze_patterns == ["bert.encoder.layer.11.**"]
    names = ["bert.emb.weight", "linear.0.weight", "linear.2.weight", "linear.0.a.b"]
    assert select("linear.0.*", names) == ["linear.0.weight"]
    assert select("bert.**", names) == ["bert.emb.weight"]
    assert r.plan(["x"], ["x"]).unused_rules == []  # freeze lines are no mapping rules


# -- text format ---------------------------------------------------------------


DELTALM_LIKE = """\
# comment line
module.{rest*} -> {rest*}   # trailing comment

src.emb.weight -> enc.emb.weight,dec.emb.weight rows[10:1001] dtype=bf16 wins
a.{i}.b   ->   c.{i}.b rows[@v.txt]
ignore cls.**
ignore-target **.version
freeze bert.**
unfreeze classifier.*
"""


def test_str_round_trips(tmp_path: Path):
    (tmp_path / "v.txt").write_text("0\n")
    r = Rules.parse(DELTALM_LIKE, base_dir=tmp_path)
    assert str(r) == (
        "module.{rest*} -> {rest*}\n"
        "src.emb.weight -> enc.emb.weight, dec.emb.weight rows[10:1001] dtype=bf16 wins\n"
        "a.{i}.b -> c.{i}.b rows[@v.txt]\n"
        "ignore cls.**\n"
        "ignore-target **.version\n"
        "freeze bert.**\n"
        "unfreeze classifier.*\n"
    )
    again = Rules.parse(str(r), base_dir=tmp_path)
    assert again == r and str(again) == str(r)
    assert [(x.line, x.column) for x in r.rules] == [
        (2, 1),
        (4, 1),
        (5, 1),
        (6, 1),
        (7, 1),
        (8, 1),
        (9, 1),
    ]


def test_python_built_rules_equal_text_built(tmp_path: Path):
    (tmp_path / "v.txt").write_text("0\n")
    built = (
        Rules(base_dir=tmp_path)
        .strip_prefix("module.")
        .rename(
            "src.emb.weight",
            ["enc.emb.weight", "dec.emb.weight"],
            rows=slice(10, 1001),
            dtype=torch.bfloat16,
            wins=True,
        )
        .rename("a.{i}.b", "c.{i}.b", rows="v.txt")
        .ignore("cls.**")
        .ignore_target("**.version")
        .freeze("bert.**")
        .unfreeze("classifier.*")
    )
    # bf16 written through torch's name: equal plans, texts differ only in that word.
    text = DELTALM_LIKE.replace("dtype=bf16", "dtype=bfloat16")
    assert built == Rules.parse(text, base_dir=tmp_path)
    listed = Rules(
        [
            ("module.{rest*}", "{rest*}"),
            ("src.emb.weight", ["enc.emb.weight", "dec.emb.weight"]),
            "ignore cls.**",
        ]
    )
    assert listed == Rules.parse(
        "module.{rest*} -> {rest*}\nsrc.emb.weight -> enc.emb.weight, dec.emb.weight\nignore cls.**"
    )
    assert Rules().add_prefix("bert") == Rules.parse("{rest*} -> bert.{rest*}")


def test_as_rules(tmp_path: Path):
    f = tmp_path / "r.rules"
    f.write_text("a -> b\n")
    assert as_rules(None) is None
    r = Rules.parse("a -> b")
    assert as_rules(r) is r
    assert as_rules(f) == r
    assert as_rules(str(f)) == r
    assert as_rules("a -> b") == r
    assert as_rules("ignore cls.**") == Rules([("ignore cls.**")])
    with pytest.raises(FileNotFoundError, match="rules file not found: no_such.rules"):
        as_rules("no_such.rules")
    with pytest.raises(TypeError, match="not int"):
        as_rules(3)
    assert fastckpt.as_rules is as_rules and fastckpt.Rules is Rules


PARSE_ERRORS = [
    ("a.{b -> c", "rules.txt:1:3: unclosed '{'"),
    (
        "ok -> fine\n\n  x.{i}.y -> z.{i}.{j}",
        "rules.txt:3:20: unknown capture {j}: the source pattern does not define it",
    ),
    ("a..b -> c", "rules.txt:1:3: empty segment"),
    ("a. -> c", "rules.txt:1:3: empty segment"),
    (".a -> c", "rules.txt:1:1: empty segment"),
    ("a.b{x} -> c", "rules.txt:1:4: a capture must be a whole segment"),
    ("a.{x}b -> c", "rules.txt:1:6: a capture must be a whole segment"),
    ("a.x* -> c", "rules.txt:1:4: '*' must be a whole segment"),
    ("a.*** -> c", "rules.txt:1:3: '*' must be a whole segment"),
    ("a.x} -> c", "rules.txt:1:4: unexpected '}'"),
    ("a.{1x} -> c", "rules.txt:1:4: bad capture name '1x'"),
    ("a.{} -> c", "rules.txt:1:4: bad capture name ''"),
    ("{x}.{x} -> c", "rules.txt:1:5: capture {x} appears twice"),
    (
        "a.** -> b.**",
        ("rules.txt:1:11: wildcards are not allowed in a target; "
        "name a capture in the source, like {name*}"),
    ),
    ("a b", "rules.txt:1:3: expected '->' after the source pattern, found 'b'"),
    ("a", "rules.txt:1:2: expected '->' after the source pattern"),
    ("a ->", "rules.txt:1:5: expected a target after '->'"),
    ("a -> b,", "rules.txt:1:8: expected a target after ','"),
    ("-> b", "rules.txt:1:1: expected a source pattern before '->'"),
    (
        "a -> b c",
        ("rules.txt:1:8: unknown attribute 'c' (expected rows[...], dtype=..., wins, stack[...], "
        "cat[...], pick[...], split[...], transpose, rope[...] or unrope[...])"),
    ),
    ("a -> b rows[:10", "rules.txt:1:12: unclosed '['"),
    ("a -> b rows[5]", "rules.txt:1:13: rows[...] takes a range A:B or @file"),
    ("a -> b rows[x:10]", "rules.txt:1:13: bad row number 'x'"),
    ("a -> b rows[1:-2]", "rules.txt:1:15: bad row number '-2'"),
    ("a -> b rows[9:3]", "rules.txt:1:13: rows[9:3]: start is after stop"),
    ("a -> b rows[@]", "rules.txt:1:14: expected a file name after '@'"),
    ("a -> b rows[:1] rows[:2]", "rules.txt:1:17: rows given twice"),
    ("a -> b dtype=fp12", "rules.txt:1:14: unknown dtype 'fp12' (use bf16, fp16, fp32, fp64, ...)"),
    ("a -> b dtype=", "rules.txt:1:14: expected a dtype after 'dtype='"),
    ("a -> b wins wins", "rules.txt:1:13: wins given twice"),
    ("ignore", "rules.txt:1:7: expected a pattern after 'ignore'"),
    ("ignore-target a b", "rules.txt:1:17: unexpected 'b' after the pattern"),
    ("\tfreeze a.{", "rules.txt:1:11: unclosed '{'"),
]


@pytest.mark.parametrize(("text", "message"), PARSE_ERRORS, ids=[m for _, m in PARSE_ERRORS])
def test_parse_errors_name_line_and_column(text, message):
    with pytest.raises(CheckpointError) as e:
        Rules.parse(text, source="rules.txt")
    assert str(e.value) == message


def test_file_errors_name_the_file(tmp_path: Path):
    f = tmp_path / "port.rules"
    f.write_text("a -> b\n# fine\nc.{x -> d\n")
    with pytest.raises(CheckpointError) as e:
        Rules.from_file(f)
    assert str(e.value) == f"{f}:3:3: unclosed '{{'"


def test_python_built_errors_point_at_the_item():
    with pytest.raises(CheckpointError) as e:
        Rules([("a", "b"), ("c.{i}", "d.{j}")])
    assert (
        str(e.value) == "<python>:2:12: unknown capture {j}: the source pattern does not define it"
    )


def test_keyword_named_key_can_still_be_renamed():
    (m,) = Rules.parse("freeze -> frozen").match(["freeze"])
    assert m is not None and m.targets == ("frozen",)


def test_arrow_without_spaces():
    assert Rules.parse("a.{x}->b.{x}") == Rules.parse("a.{x} -> b.{x}")


# -- property test: the trie against a regex reference ---------------------------

ALPHABET = ["a", "b", "c"]


@st.composite
def rule_sets(draw):
    rules = []
    for n in range(draw(st.integers(1, 6))):
        elems = draw(
            st.lists(
                st.sampled_from(["lit", "lit", "one", "many", "star", "dstar"]),
                min_size=1,
                max_size=4,
            )
        )
        src, caps = [], []
        for k, kind in enumerate(elems):
            if kind == "lit":
                src.append(draw(st.sampled_from(ALPHABET)))
            elif kind == "one":
                src.append(f"{{c{k}}}")
                caps.append(f"{{c{k}}}")
            elif kind == "many":
                src.append(f"{{m{k}*}}")
                caps.append(f"{{m{k}*}}")
            else:
                src.append("*" if kind == "star" else "**")
        if draw(st.integers(0, 4)) == 0:
            rules.append("ignore " + ".".join(src))
            continue
        targets = []
        for _ in range(draw(st.integers(1, 2))):
            parts = draw(st.lists(st.sampled_from(ALPHABET + caps), min_size=1, max_size=3))
            targets.append(".".join([f"t{n}", *parts]))  # a literal head: never empty
        rules.append(".".join(src) + " -> " + ", ".join(targets))
    return rules


keys_strategy = st.lists(
    st.lists(st.sampled_from(ALPHABET), min_size=1, max_size=5).map(".".join), max_size=30
)


def reference_match(rule_lines: list[str], key: str):
    """Regex over "seg/seg/" text: one segment is `[^/]+/`; greedy like the trie."""
    text = "".join(s + "/" for s in key.split("."))
    for line_no, line in enumerate(rule_lines):
        ignore = line.startswith("ignore ")
        src = line.removeprefix("ignore ") if ignore else line.split(" -> ")[0]
        regex = ""
        for seg in src.split("."):
            if seg in ("*", "**"):
                regex += "(?:[^/]+/)" if seg == "*" else "(?:[^/]+/)*"
            elif seg.startswith("{"):
                name = seg.strip("{}*")
                regex += (
                    f"(?P<{name}>[^/]+/)" if not seg.endswith("*}") else f"(?P<{name}>(?:[^/]+/)*)"
                )
            else:
                regex += re.escape(seg + "/")
        m = re.fullmatch(regex, text)
        if not m:
            continue
        if ignore:
            return line_no, ()
        targets = []
        for tmpl in line.split(" -> ")[1].split(", "):
            segs = []
            for part in tmpl.split("."):
                if part.startswith("{"):
                    segs += [s for s in m.group(part.strip("{}*")).split("/") if s]
                else:
                    segs.append(part)
            targets.append(".".join(segs))
        return line_no, tuple(targets)
    return None


@settings(max_examples=300, deadline=None)
@given(rule_sets(), keys_strategy)
def test_trie_matches_like_the_reference(rule_lines, keys):
    rules = Rules(rule_lines)
    got = [None if m is None else (m.rule.line - 1, m.targets) for m in rules.match(keys)]
    assert got == [reference_match(rule_lines, k) for k in keys]


@settings(max_examples=200, deadline=None)
@given(rule_sets(), keys_strategy, st.lists(st.sampled_from(ALPHABET), max_size=4))
def test_plan_agrees_with_matches(rule_lines, keys, extra_targets):
    keys = list(dict.fromkeys(keys))
    rules = Rules(rule_lines)
    expected: dict[str, set[str]] = {}
    for key in keys:
        ref = reference_match(rule_lines, key)
        if ref is None:
            expected.setdefault(key, set()).add(key)
        else:
            for t in ref[1]:
                expected.setdefault(t, set()).add(key)
    target_keys = [k for k in keys if reference_match(rule_lines, k) is None] + extra_targets
    target_keys = list(dict.fromkeys(target_keys))
    # identity pairs only exist for names the target has
    expected = {t: s for t, s in expected.items() if not (s == {t} and t not in target_keys)}
    if any(len(s) > 1 for s in expected.values()):
        with pytest.raises(CheckpointError, match="has two sources"):
            rules.plan(keys, target_keys)
        return
    plan = rules.plan(keys, target_keys)
    assert pairs(plan) == {t: next(iter(s)) for t, s in expected.items()}
    assert len(plan.assignments) == len(expected)


# -- docs/STORIES.md story 2: DDP prefix, gamma/beta, BertForPreTraining -> BertModel -----


def tiny_bert_keys() -> tuple[list[str], list[str]]:
    transformers = pytest.importorskip("transformers")
    config = tiny_hf_config()
    pretraining = list(transformers.BertForPreTraining(config).state_dict())
    plain = list(transformers.BertModel(config).state_dict())
    return pretraining, plain


def tf_style(key: str) -> str:
    """Old TF-converted naming: LayerNorm.gamma / LayerNorm.beta."""
    if ".LayerNorm." in key:
        return key.replace(".LayerNorm.weight", ".LayerNorm.gamma").replace(
            ".LayerNorm.bias", ".LayerNorm.beta"
        )
    return key


STORY2_RULES = """\
module.bert.{p*}.gamma -> {p*}.weight
module.bert.{p*}.beta -> {p*}.bias
module.bert.{rest*} -> {rest*}
ignore module.cls.**
"""


def test_story2_ddp_gamma_beta_pretraining_into_bert_model():
    pretraining, plain = tiny_bert_keys()
    saved = ["module." + tf_style(k) for k in pretraining]  # DDP-wrapped, TF names
    plan = Rules.parse(STORY2_RULES).plan(saved, plain)
    expected = {t: "module." + tf_style("bert." + t) for t in plain}
    assert pairs(plan) == expected
    assert len(plan.assignments) == len(plain)
    assert plan.ignored_sources == [k for k in saved if k.startswith("module.cls.")]
    assert len(plan.ignored_sources) == 9
    assert plan.unused_rules == [] and plan.ignored_targets == []
    # The LayerNorm keys went through the gamma/beta rules, the rest through the prefix rule.
    rule_of = {a.target: a.rule for a in plan.assignments}
    assert rule_of["embeddings.LayerNorm.weight"] == "module.bert.{p*}.gamma -> {p*}.weight"
    assert rule_of["encoder.layer.1.output.LayerNorm.bias"] == "module.bert.{p*}.beta -> {p*}.bias"
    assert rule_of["pooler.dense.weight"] == "module.bert.{rest*} -> {rest*}"


def test_story2_without_the_ignore_the_heads_are_left_over():
    pretraining, plain = tiny_bert_keys()
    saved = ["module." + k for k in pretraining]
    plan = Rules().strip_prefix("module.bert.").plan(saved, plain)
    assert pairs(plan) == {t: "module.bert." + t for t in plain}
    # module.cls.* match no rule and name no target: the loader reports them unexpected.
    used = {a.source for a in plan.assignments}
    assert sorted(k for k in saved if k not in used) == sorted(
        k for k in saved if k.startswith("module.cls.")
    )


def test_many_wildcards_over_a_long_key_stay_fast_and_greedy():
    # Five `**` over 60 segments: ~5 million ways to split for a plain backtracking walk.
    lines = ["**.**.**.**.**.x -> y", "{a*}.b.{c*}.b.{d*} -> {d*}.{c*}.{a*}"]
    key = ".".join(["a", "b"] * 30)
    (m,) = Rules(lines).match([key])
    assert m is not None
    assert (m.rule.line - 1, m.targets) == reference_match(lines, key)
    (hit,) = Rules(lines).match([key + ".x"])
    assert hit is not None and hit.targets == ("y",)
