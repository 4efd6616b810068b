"""trifuse's benchmark harness: GPU timing done right, peers side by side, readable reports."""

if __name__ != "trifuse.bench":  # the source folder imported by its bare name
    from trifuse.sourcetree import stand_aside

    stand_aside(__name__, __file__)
