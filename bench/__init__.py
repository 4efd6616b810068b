"""trifuse's benchmark harness: GPU timing done right, peers side by side, readable reports."""
