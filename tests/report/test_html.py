"""The report page: jinja2 with autoescape, decoded tokens, contents, summary first,
folded tables, labelled colorbars, benchmarks and environment; from synthetic results."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from typing import ClassVar

import torch

from attnlab.analysis import (
    AttentionDistance,
    Entropy,
    Flow,
    FutureInfluence,
    Rollout,
    Sinks,
    TokenPatterns,
    analyze_maps,
)
from attnlab.analysis.maps import HeadMaps
from attnlab.report import html as page
from attnlab.report import plots
from attnlab.report.page import write_report
from attnlab.report.tokens import token_texts, visible
from tests.analysis.synthetic import causal_uniform, shifted_diagonal, to_position

EVIL = "<script>alert('x')</script>"
HALF = 20  # the repeated sequence: HALF random tokens, then the same again
N = 2 * HALF
LAYERS, HEADS = 4, 3


def synthetic_words(n: int = N) -> list[str]:
    """Decoded-looking token texts with spaces, a newline and markup to escape."""
    words = [f" w{i}" for i in range(n)]
    words[0] = EVIL
    words[3] = "\n"
    words[5] = '"><img src=x onerror=alert(1)>'
    return words


def synthetic_run(tmp_path, bench: bool = True):
    """A results set shaped like ``attnlab analyze``'s, from synthetic attention maps.

    Per layer, head 0 sinks into token 0, head 1 looks at the token before, head 2
    at the token after the earlier copy (an induction head on the repeated
    sequence). Retrieval and importance rows are made up; ``bench`` writes a
    ``bench-speed.json`` next to the page as ``make demo`` does. Returns the
    arguments of :func:`write_report`.
    """
    words = synthetic_words()
    sink = 0.7 * to_position(N, 0) + 0.3 * causal_uniform(N)
    maps = [
        torch.stack([sink, shifted_diagonal(N, 1), shifted_diagonal(N, HALF - 1)])[None]
        for _ in range(LAYERS)
    ]
    hidden = torch.randn(1, N, 16)
    hidden[0, 0, 3] = 5000.0  # a massive activation on the sink token
    rows = analyze_maps(
        maps,
        [Sinks(top_k=5, ratio_min=3.0), Entropy(), AttentionDistance(), FutureInfluence()],
        tokens=words,
        hidden_states=(hidden,) * LAYERS,
    )
    repeated = torch.randint(100, 1000, (1, HALF)).repeat(1, 2)
    patterns = analyze_maps(maps, [TokenPatterns()], input_ids=repeated)
    rows += [{**r, "input": "repeated random tokens"} for r in patterns]
    for layer in range(LAYERS):
        for head in range(HEADS):
            score = 0.6 if (layer, head) == (2, 1) else 0.02 * head
            rows.append(
                {
                    "analysis": "retrieval",
                    "layer": layer,
                    "head": head,
                    "metric": "retrieval_score",
                    "value": score,
                    "trials": 2,
                    "context_tokens": N,
                }
            )
            rows.append(
                {
                    "analysis": "importance",
                    "layer": layer,
                    "head": head,
                    "metric": "head_importance",
                    "value": 0.01 * (layer + head),
                    "method": "gradient",
                }
            )
    rows.append(
        {
            "analysis": "retrieval",
            "layer": None,
            "head": None,
            "metric": "needle_accuracy",
            "value": 0.5,
            "trials": 2,
            "context_tokens": N,
            "answers": ["1234", EVIL],
        }
    )
    short = [m[:, :, :12, :12] / m[:, :, :12, :12].sum(-1, keepdim=True) for m in maps]
    rollout, flow = Rollout(), Flow()
    rows += analyze_maps(short, [rollout, flow], tokens=words[:12])
    on_input, on_repeat = HeadMaps([(0, 0)]), HeadMaps([(1, 2)])
    analyze_maps(maps, [on_input], tokens=words)
    analyze_maps(maps, [on_repeat], input_ids=repeated)
    head_maps = {
        "rollout": (rollout, words[:12]),
        "flow": (flow, words[:12]),
        "heads": [
            (on_input, words, [((0, 0), "strongest first-token sink, 0.70")], "the input"),
            (on_repeat, [f" r{i}" for i in range(N)], [((1, 2), "best induction head, 1.00")],
             "a random sequence repeated once"),
        ],
    }  # fmt: skip
    if bench:
        records = [
            {
                "mechanism": m,
                "n": n,
                "causal": True,
                "ms": 1.5 * n / 1024,
                "ms_repeats": [1.0],
                "skipped": None,
            }
            for m in ("softmax", "chunked")
            for n in (1024, 4096)
        ]
        (tmp_path / "bench-speed.json").write_text(json.dumps(records))
    meta = {
        "model": "toy<b>",
        "source": EVIL,
        "tokens": N,
        "analyses": ["sinks", "entropy", "distance", "fai", "patterns", "retrieval"],
        "retrieval_text": "the file haystack.txt",
        "importance": "gradient",
        "seconds": 1.0,
        "n_layers": LAYERS,
        "n_heads": HEADS,
    }
    return tmp_path, rows, meta, words, head_maps


class _Outline(HTMLParser):
    """The page's ids, links, section order, <details> contents and figcaptions."""

    def __init__(self):
        super().__init__()
        self.ids, self.links, self.sections, self.captions, self.alts = [], [], [], [], []
        self.details_depth, self.folded_rows, self._in = 0, 0, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "section":
            self.sections.append(a["id"])
        if tag == "a" and a.get("href", "").startswith("#"):
            self.links.append(a["href"][1:])
        if tag == "details":
            self.details_depth += 1
        if tag == "tr" and self.details_depth:
            self.folded_rows += 1
        if tag == "img":
            self.alts.append(a.get("alt"))
        if tag == "figcaption":
            self._in = ""

    def handle_endtag(self, tag):
        if tag == "details":
            self.details_depth -= 1
        if tag == "figcaption":
            self.captions.append(self._in)
            self._in = None

    def handle_data(self, data):
        if self._in is not None:
            self._in += data


def _outline(text: str) -> _Outline:
    o = _Outline()
    o.feed(text)
    return o


def test_report_is_self_contained_and_escapes_token_text(tmp_path):
    path = write_report(*synthetic_run(tmp_path))
    text = path.read_text(encoding="utf-8")
    assert "<script" not in text.lower()
    assert "<img src=x" not in text and '"><img' not in text
    assert "&lt;script&gt;" in text
    # every image is inlined; nothing is fetched from a file or the network
    srcs = re.findall(r'src="([^"]*)"', text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r"(href|src)=\"(https?:)?//", text)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"heatmap_first_token_attention.png", "sink_positions.png", "rollout.png"} <= files


def test_contents_link_every_section_and_the_summary_comes_first(tmp_path):
    text = write_report(*synthetic_run(tmp_path)).read_text(encoding="utf-8")
    o = _outline(text)
    assert o.sections[0] == "summary-of-findings"
    assert set(o.sections) <= set(o.links)  # the table of contents names every section
    assert set(o.links) <= set(o.ids)  # and every link lands
    summary = text[text.index('id="summary-of-findings"') : text.index('id="input"')]
    # the strongest heads with their scores: sink L0H0, previous-token L*H1, induction L*H2,
    # retrieval L2H1 (0.6)
    assert "Attention sinks" in summary and "L0H0" in summary
    assert "Retrieval heads" in summary and "L2H1 <b>0.6</b>" in summary
    assert "Previous-token heads" in summary and re.search(r"L\dH1 <b>1</b>", summary)
    assert "Induction heads" in summary and re.search(r"L\dH2 <b>1</b>", summary)
    # the first figure comes before the first table
    assert text.index("<figure>") < text.index("<table>")


def test_long_tables_are_folded_and_short_ones_are_not(tmp_path):
    text = write_report(*synthetic_run(tmp_path)).read_text(encoding="utf-8")
    o = _outline(text)
    sinks = text[text.index('id="attention-sinks"') :]
    sinks = sinks[: sinks.index("</section>")]
    # 4 layers x 5 ranks of sink rows: longer than FOLD_ROWS, inside <details>
    assert "<details><summary>Most-attended positions per layer (20 rows)" in sinks
    assert o.folded_rows >= 20
    env = text[text.index('id="environment"') :]
    assert "<details>" not in env[: env.index("</section>")]


def test_tokens_are_shown_as_text_with_visible_newlines(tmp_path):
    text = write_report(*synthetic_run(tmp_path)).read_text(encoding="utf-8")
    assert '<span class="tok"> w1</span>' in text  # leading space kept, in a box
    assert '<span class="tok">↵</span>' in text  # the newline token drawn, not a line break


def test_token_texts_decode_pieces_instead_of_showing_them():
    class ByteLevel:
        pieces: ClassVar = {0: "PR", 1: "IDE", 2: "ĠAND", 3: "Ċ"}

        def convert_ids_to_tokens(self, ids):
            return [self.pieces[i] for i in ids]

        def convert_tokens_to_string(self, tokens):
            return "".join(tokens).replace("Ġ", " ").replace("Ċ", "\n")

    assert token_texts(ByteLevel(), [0, 1, 2, 3]) == ["PR", "IDE", " AND", "\n"]
    assert [visible(t) for t in (" AND", "\n\n", " ", "  ")] == [" AND", "↵↵", "␣", "␣␣"]

    class DecodeOnly:
        def decode(self, ids):
            return {7: " the"}[ids[0]]

    assert token_texts(DecodeOnly(), torch.tensor([7])) == [" the"]


def test_captions_say_how_to_read_and_do_not_repeat_the_title(tmp_path):
    text = write_report(*synthetic_run(tmp_path)).read_text(encoding="utf-8")
    o = _outline(text)
    assert len(o.captions) == len(o.alts) >= 10
    for caption, alt in zip(o.captions, o.alts, strict=True):
        assert caption.strip() != alt.strip() and not caption.startswith(alt)
        assert len(caption) > 60
    assert any("One cell per head" in c and "Highest: L" in c for c in o.captions)


def test_benchmarks_next_to_the_page_are_shown_with_shared_columns_in_the_caption(tmp_path):
    text = write_report(*synthetic_run(tmp_path)).read_text(encoding="utf-8")
    bench = text[text.index('id="benchmarks-in-this-folder"') :]
    bench = bench[: bench.index("</section>")]
    assert "bench-speed.json: causal True</p>" in bench  # no column of Nones
    assert "<th>mechanism</th><th>n</th><th>ms</th>" in bench
    assert bench.count("<tr>") == 1 + 4 and "chunked" in bench and "5.859" not in bench
    assert '<td class="num">6</td>' in bench  # 1.5 * 4096 / 1024


def test_no_benchmark_section_without_bench_files(tmp_path):
    text = write_report(*synthetic_run(tmp_path, bench=False)).read_text(encoding="utf-8")
    assert "benchmarks-in-this-folder" not in text


def test_environment_names_the_versions_and_the_kernels(tmp_path):
    import attnlab

    text = write_report(*synthetic_run(tmp_path)).read_text(encoding="utf-8")
    env = text[text.index('id="environment"') :]
    assert f"<td>{torch.__version__} (" in env
    assert f"<td>{attnlab.__version__}</td>" in env
    assert "native kernels" in env and "transformers" in env


def test_heatmap_colorbar_is_full_height_and_labelled(tmp_path):
    rows = [
        {"analysis": "a", "metric": "m", "layer": layer, "head": h, "value": float(layer * h)}
        for layer in range(30)
        for h in range(9)
    ]
    fig = plots.heatmap_figure(rows, "m", analysis="a", title="t", unit="tokens back")
    ax, bar = fig.axes
    assert bar.get_ylabel() == "tokens back"
    fig.canvas.draw()
    a, b = ax.get_position(), bar.get_position()
    assert abs(a.height - b.height) < 1e-6 and abs(a.y0 - b.y0) < 1e-6
    assert b.x0 > a.x1


def test_attention_map_labels_its_axes_with_readable_tokens():
    tokens = [" The", " cat", "\n", "Ġ", " sat"]
    fig = plots.attention_map_figure(torch.rand(5, 5), tokens, title="t")
    ax, bar = fig.axes
    fig.canvas.draw()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["The", "cat", "↵", "Ġ", "sat"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["The", "cat", "↵", "Ġ", "sat"]
    assert bar.get_ylabel() == "attention weight"


def test_render_escapes_every_text_field(tmp_path):
    png = tmp_path / "x.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    s = page.Section(
        EVIL,
        paragraphs=[EVIL],
        tokens=[EVIL],
        findings=[page.Finding(EVIL, EVIL, [(EVIL, 0.5)])],
        figures=[page.Figure(png, EVIL, EVIL)],
        tables=[page.Table(EVIL, [EVIL], [[EVIL, page.Token(EVIL), 1.5]])],
    )
    text = page.render(EVIL, [s], intro=[EVIL], facts=[(EVIL, EVIL)])
    assert "<script" not in text
    # title, h1, intro, fact label and value, toc entry, h2, paragraph, finding title,
    # text and head, token, figure alt and caption, table caption, header, two cells
    assert text.count("&lt;script&gt;") == 18


def test_chosen_heads_draw_a_head_chosen_twice_once_with_both_reasons(tmp_path):
    from attnlab.report.analyze import _chosen_heads

    _, rows, *_ = synthetic_run(tmp_path, bench=False)
    for r in rows:  # make the retrieval head the induction head too
        if r["metric"] == "retrieval_score":
            r["value"] = 0.9 if (r["layer"], r["head"]) == (0, 2) else 0.0
    chosen = _chosen_heads(rows)
    assert ((0, 0), "strongest first-token sink, 0.72", "input") in chosen
    induction = [why for head, why, on in chosen if head == (0, 2) and on == "repeated"]
    assert induction == ["best induction head, 1.00; best retrieval head, 0.90"]


def test_bench_tables_read_envelopes_and_name_unreadable_files(tmp_path):
    from attnlab.report.page import bench_tables

    rows = [{"mechanism": m, "n": 1024, "ms": ms} for m, ms in (("a", 2.0), ("b", 3.0))]
    envelope = {"schema": 1, "command": "attnlab bench scaling", "rows": rows}
    (tmp_path / "bench-scaling.json").write_text(json.dumps(envelope))
    (tmp_path / "bench-broken.json").write_text("{not json")
    (tmp_path / "other.json").write_text("[]")
    broken, scaling = bench_tables(tmp_path)
    assert broken.caption.startswith("bench-broken.json: not readable as JSON")
    assert not broken.header and not broken.rows
    assert scaling.caption == (
        "bench-scaling.json: schema 1, command attnlab bench scaling, n 1024"
    )
    assert list(scaling.header) == ["mechanism", "ms"]
    assert scaling.rows == [["a", 2.0], ["b", 3.0]]
