def main(*a, **k): raise NotImplementedError
