"""Pre-flight results on the dashboard: one result (its verdict line, per-layer scores and the
examples that push refusal most each way), the section beside a run whose training data has
results, and the table of every result in the store (the Pre-flight page, views/preflight.py).

Why a module and not a page: the run-detail page and the Pre-flight page show a result the same
way. Texts from the data (prompts, responses, the model's own answers) are shown in dataframes
only, which render plain text; paths and model names inside markdown go through
:func:`~drift_monitor.dashboard.common.plain`: never markup, never HTML.
"""

from __future__ import annotations

from collections.abc import Callable

import altair as alt
import pandas as pd
import streamlit as st

from drift_monitor.dashboard.common import plain
from drift_monitor.preflight.format import layer_span, num
from drift_monitor.preflight.result import ExampleScore, FeaturePush, PreflightResult
from drift_monitor.store import StoreReader
from drift_monitor.store.preflights import result_of, run_preflights

#: The Pre-flight page, as ``st.switch_page`` / ``st.page_link`` name it (relative to app.py).
PREFLIGHT_PAGE = "views/preflight.py"

#: The columns of the results table (StoreReader.preflights() columns, plus the verdict).
LIST_COLUMNS = ("created_at", "dataset", "model", "score", "direction", "n_examples", "mode",
                "data_refusal_share", "own_refusal_share", "data_hash", "preflight_id")


def direction(res: PreflightResult) -> str:
    """The result's verdict (``PreflightResult.direction``); a NaN score (no example could be
    read) is 'not measured', not 'neutral'."""
    return "not measured" if res.score != res.score else res.direction


def verdict(res: PreflightResult) -> str:
    """The one line a run shows: what the data would do to the start model's refusal (markdown:
    the dataset path and model name as plain text)."""
    return (f"Pre-flight: {plain(res.dataset)} scored {num(res.score)} ({direction(res)}) against "
            f"{plain(res.model or res.model_fingerprint or 'the start model')}")


def layer_chart(res: PreflightResult) -> alt.LayerChart:
    """The dataset score read at each layer alone, the scored layers marked, zero as a rule."""
    df = pd.DataFrame({"layer": list(res.per_layer), "score": list(res.per_layer.values())})
    df["scored"] = df["layer"].isin(res.layers)
    line = alt.Chart(df, title="Score per layer").mark_line(point=True).encode(
        x=alt.X("layer:Q", title="decoder layer"), y=alt.Y("score:Q", title="score (refusal-gap units)"),
        tooltip=["layer", "score", "scored"])
    zero = alt.Chart(pd.DataFrame({"score": [0.0]})).mark_rule(strokeDash=[4, 3], color="gray").encode(y="score:Q")
    return alt.layer(line, zero)


def examples_table(examples: list[ExampleScore]) -> pd.DataFrame:
    """Top examples of one direction: where they are in the data, their text and score; the model's
    own answer when the check generated it (``--generate``)."""
    df = pd.DataFrame({
        "index": [e.index for e in examples], "score": [e.score for e in examples],
        "prompt": [e.prompt or "" for e in examples], "response": [e.response for e in examples],
        "own_answer": [e.own_text or "" for e in examples],
    })
    return df if any(e.own_text for e in examples) else df.drop(columns="own_answer")


def example_tables(tables: tuple[tuple[str, list[ExampleScore], str], ...],
                   frame: Callable[[list[ExampleScore]], pd.DataFrame], key: str, emphasis: str) -> None:
    """Each (title, examples, key suffix) as a titled dataframe built by ``frame``, or 'none listed'."""
    for title, rows, which in tables:
        st.markdown(f"{emphasis}{title}{emphasis}")
        if rows:
            st.dataframe(frame(rows), hide_index=True, width="stretch", key=f"{key}_{which}")
        else:
            st.caption("none listed")


def show_result(res: PreflightResult, key: str) -> None:
    """A result in full: its figures, the per-layer chart and the top examples each way."""
    c = st.columns(4)
    c[0].metric("dataset score", num(res.score), help="> 0: the data refuses more than the start model would "
                "(fine-tuning should raise refusal); < 0: less (it should erode refusal)")
    c[1].metric("examples", f"{res.n_examples:,}")
    c[2].metric("refusals in the data", num(res.data_refusal_share, ".1%"))
    c[3].metric("refusals in its own answers", num(res.own_refusal_share, ".1%"))
    st.caption(f"Model {plain(res.model or '-')} (fingerprint {plain(res.model_fingerprint or '-')}), data hash "
               f"{plain(res.data_hash)}, own answers {res.mode}, score over layers {layer_span(res.layers)}, checked "
               f"{res.created_at}.")
    if res.per_layer:
        st.altair_chart(layer_chart(res), width="stretch", key=f"{key}_layers")
    example_tables((("Examples that raise refusal most", res.raises, "raises"),
                    ("Examples that erode refusal most", res.erodes, "erodes")), examples_table, key, "**")
    if res.feature_score is not None or res.sae_features:
        show_features(res, key)


def feature_examples_table(examples: list[ExampleScore]) -> pd.DataFrame:
    """Top examples by the refusal-feature score: the data's response's activity on the start's
    refusal features, the model's own answer's, and their difference."""
    return pd.DataFrame({
        "index": [e.index for e in examples], "feature_score": [e.feature_score for e in examples],
        "data": [e.response_features for e in examples], "own": [e.own_features for e in examples],
        "prompt": [e.prompt or "" for e in examples], "response": [e.response for e in examples],
    })


def pushes_table(pushes: list[FeaturePush]) -> pd.DataFrame:
    """The features one SAE says the data's responses push most, refusal features marked."""
    return pd.DataFrame({
        "feature": [f.feature for f in pushes], "push": [f.push for f in pushes],
        "data_mean": [f.data_mean for f in pushes], "own_mean": [f.own_mean for f in pushes],
        "refusal_feature": [f.refusal for f in pushes],
    })


def show_features(res: PreflightResult, key: str) -> None:
    """With SAEs: the refusal-feature score, the examples that push the start's refusal features
    most each way, and per SAE the features the data's responses push most."""
    st.markdown("**SAE features**")
    k = ", ".join(f"{plain(h)}: {len(f)}" for h, f in res.refusal_features.items()) or "-"
    st.caption(f"Refusal-feature score {num(res.feature_score)}: per example, the mean over response tokens of "
               f"the start's refusal features' summed codes, data minus the model's own answer (refusal features "
               f"per SAE: {k}).")
    example_tables((("Examples that raise the refusal features most", res.feature_raises, "f_raises"),
                    ("Examples that lower the refusal features most", res.feature_erodes, "f_erodes")),
                   feature_examples_table, key, "*")
    for i, (hook, pushes) in enumerate(res.sae_features.items()):
        st.markdown(f"*Features the data pushes most at {plain(hook)}*")
        if pushes:
            st.dataframe(pushes_table(pushes), hide_index=True, width="stretch", key=f"{key}_push_{i}")
        else:
            st.caption("none above the model's own answers")


def run_section(r: StoreReader, run: pd.Series) -> None:
    """Beside a run: the newest pre-flight result of the data it trains on (``outputs.train_data``),
    found by the file's hash where it can be read here, else by its path. Says nothing for a run
    that names no data in a store without pre-flight results."""
    found = run_preflights(r, run.get("config_json"))
    if found is None:
        if len(r.preflights()):
            st.caption("This store holds pre-flight results (Pre-flight page); a run started with "
                       "`outputs.train_data` shows those of its data here.")
        return
    if found.rows.empty:
        how = f"data hash {found.data_hash}" if found.by == "data_hash" else "that path (the file is not readable here)"
        st.caption(f"No pre-flight result for this run's training data {plain(found.train_data)} ({how}).")
        return
    res = result_of(found.rows.iloc[0])
    how = "matched by the file's hash" if found.by == "data_hash" else \
        "matched by its path: the file is not readable here, so whether it changed since is unknown"
    st.info(verdict(res), icon=":material/flight_takeoff:")
    more = f"; {len(found.rows) - 1} earlier on this data on the Pre-flight page" if len(found.rows) > 1 else ""
    st.caption(f"Training data {plain(found.train_data)}, {how}{more}.")
    with st.expander("Pre-flight details", expanded=False):
        show_result(res, key="run_preflight")


def results_table(df: pd.DataFrame) -> pd.DataFrame:
    """Every result in the store, newest first, with its verdict."""
    out = df.assign(direction=[direction(result_of(row)) for _, row in df.iterrows()])
    return out[list(LIST_COLUMNS)].reset_index(drop=True)
