from conftest import assert_clean_error, run_module

from traces.formats.trace_read import read_trace


def test_synth_command_writes_a_valid_trace(tmp_path, small_shape):
    import json
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(small_shape.arch_config()))
    out = tmp_path / "t.parquet"
    proc = run_module("traces.synth", "--model", str(cfg), "--gen-length", "64", "--prompt-length", "32",
                      "--seed", "1", "--requests", "2", "--no-kv-cache", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    t = read_trace(out)
    assert not t.decoding.kv_cache and len(t.requests) == 2 and t.tokens_generated == 128
    assert t.shape.experts == small_shape.experts


def test_synth_bad_flags_fail_cleanly(tmp_path):
    out = tmp_path / "t.parquet"
    assert_clean_error(run_module("traces.synth", "--model", "llada3", "--out", str(out)), "unknown model")
    assert_clean_error(run_module("traces.synth", "--model", "llada2-mini", "--gen-length", "0", "--out", str(out)),
                       "--gen-length")
    (tmp_path / "afile").write_text("x")
    assert_clean_error(run_module("traces.synth", "--model", "llada2-mini", "--gen-length", "32",
                                  "--out", str(tmp_path / "afile" / "t.parquet")), "is a file, not a folder")
    made = run_module("traces.synth", "--model", "llada2-mini", "--gen-length", "8", "--out",
                      str(tmp_path / "new" / "t.parquet"))  # a missing folder is made, as the main job needs
    assert made.returncode == 0 and (tmp_path / "new" / "t.parquet").is_file(), made.stderr
    assert not out.exists()
