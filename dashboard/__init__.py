"""The Streamlit dashboard (installed as ``drift_monitor.dashboard``).

It reads the DuckDB store through :class:`drift_monitor.store.StoreReader` only.
"""
