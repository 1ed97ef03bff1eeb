"""The self-contained report: images inlined, token text escaped."""

from __future__ import annotations

import re

import torch

from attnlab.analysis import Entropy, Sinks, analyse_maps
from attnlab.analysis.maps import HeadMaps
from attnlab.report import html as page
from attnlab.report.analyze import write_report

EVIL = "<script>alert('x')</script>"


def _rows_and_words(n=24):
    words = [f"w{i}" for i in range(n)]
    words[0] = EVIL
    words[5] = '"><img src=x onerror=alert(1)>'
    maps = []
    for _ in range(2):
        m = torch.zeros(1, 2, n, n)
        m[0, :, :, 0] = 0.8
        m[0, :, :, 5] = 0.2
        m[0, :, 0, 0] = 1.0
        m[0, :, 1:5, 0] = 1.0
        maps.append(m)
    rows = analyse_maps(maps, [Sinks(), Entropy()], tokens=words)
    hm = HeadMaps([(1, 0)])
    analyse_maps(maps, [hm], tokens=words)
    return rows, words, hm


def test_report_is_self_contained_and_escapes_token_text(tmp_path):
    rows, words, hm = _rows_and_words()
    meta = {"model": "toy<b>", "source": EVIL, "tokens": len(words), "n_layers": 2, "n_heads": 2}
    path = write_report(
        tmp_path, rows, meta, words, {"heads": [(hm, words, [((1, 0), EVIL)], EVIL)]}
    )
    text = path.read_text(encoding="utf-8")
    assert "<script" not in text.lower()
    assert "onerror=alert" not in text.replace("&quot;&gt;&lt;img src=x onerror=alert(1)&gt;", "")
    assert "&lt;script&gt;" in text
    # every image is inlined; nothing is fetched from a file or the network
    srcs = re.findall(r'src="([^"]*)"', text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "heatmap_first_token_attention.png" in {p.name for p in tmp_path.iterdir()}
    assert "sink_positions.png" in {p.name for p in tmp_path.iterdir()}
    assert "The first token is the dominant sink in 2 of 2 layers." in text


def test_render_escapes_every_text_field():
    s = page.Section(EVIL, paragraphs=[EVIL], tables=[(EVIL, [EVIL], [[EVIL, 1.5]])])
    text = page.render(EVIL, [s], intro=[EVIL])
    assert "<script" not in text
    assert text.count("&lt;script&gt;") == 8  # title, h1, intro, h2, p, caption, th, td
