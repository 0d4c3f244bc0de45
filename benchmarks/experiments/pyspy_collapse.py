"""Aggregate py-spy raw (collapsed) stacks into self and inclusive percentages per file:function.

    py-spy record -r 200 -f raw -o out.txt -- python benchmarks/experiments/flush_fence.py 30000 100
    grep "Handle._run" out.txt > loop.txt; python benchmarks/experiments/pyspy_collapse.py loop.txt
"""
import sys, collections, re
self_c = collections.Counter(); incl = collections.Counter(); total = 0
for line in open(sys.argv[1]):
    stack, _, n = line.rstrip().rpartition(" ")
    n = int(n); total += n
    frames = stack.split(";")
    def norm(f):
        m = re.match(r"(.*) \((.*?):\d+\)", f)
        if m:
            fn, path = m.groups()
            path = re.sub(r".*site-packages/", "", path); path = re.sub(r".*/work/main/", "", path)
            return f"{path}:{fn}"
        return f
    fr = [norm(f) for f in frames]
    self_c[fr[-1]] += n
    for f in set(fr): incl[f] += n
print("total samples", total)
print("== self"); [print(f"{c/total:6.1%} {f}") for f, c in self_c.most_common(25)]
print("== inclusive"); [print(f"{c/total:6.1%} {f}") for f, c in incl.most_common(45)]
