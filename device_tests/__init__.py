"""Device-side scripts. ``bench.py`` ships inside the edgekd wheel as ``edgekd.device_tests`` (see
pyproject.toml's package-dir), so ``edgekd bundle`` works from an installed wheel; it imports nothing from
edgekd and runs on the device with numpy and a runtime only."""
