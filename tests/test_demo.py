"""The Quickstart's example runs and prints its table."""

from dtnh_jax import demo


def test_demo_prints_a_row_per_method(capsys):
  demo.main(["--steps", "5"])
  out = capsys.readouterr().out
  assert "L2-SP" in out and "DTNH(L2-SP)" in out
