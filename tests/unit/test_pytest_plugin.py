"""Keel's pytest plugin (orchestrator/testing.py), as a user's test session loads it."""


def test_a_test_session_does_not_show_ray_datas_warnings_about_defaults_nobody_set():
    """Ray 2.60's DataContext() sets its deprecated fields itself, and each says it is deprecated: three warnings
    under every Ray-backed test of a user's suite. pytest shows DeprecationWarnings from every test (its own
    filters say 'always'); the plugin's filters, applied to each test like the ini file's, hide these three."""
    import warnings

    import ray.data

    with warnings.catch_warnings(record=True) as caught:  # the filters in force for this test, kept
        ray.data.DataContext()
    assert [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)] == []
