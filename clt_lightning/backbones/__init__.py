"""Vision backbones behind the `Teacher`: one adapter per model family (see `registry`)."""
