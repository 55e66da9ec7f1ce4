from test_stack import *  # noqa
from test_stack import prometheus, stack, model_name  # noqa

def test_dump(prometheus):
    for d in DASHBOARDS:
        for where, expr in dashboard_targets(d):
            err, res = prometheus.query(grafana_to_promql(expr))
            vals = [r["value"][1] for r in res][:4]
            print(d.stem[11:], where, err, vals)
