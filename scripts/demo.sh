#!/usr/bin/env bash
# The README's main job: set up, build the Fashion-MNIST shards if missing, train HCSC on the CPU
# (configs/demo_fmnist.yaml), and print kNN top-1 on the test split and clustering NMI at the end.
# Extra arguments are config overrides, e.g. scripts/demo.sh optim.epochs=4
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
SHARDS=${HCSC_DEMO_SHARDS:-data/fmnist-shards}
FMNIST=/usr/share/datasets/fashion-mnist
for split in train val; do
    part=$([ "$split" = train ] && echo train || echo test)
    if ! .venv/bin/python -c "import sys; from shards.format import split_info; split_info(sys.argv[1], sys.argv[2])" \
            "$SHARDS" "$split" 2>/dev/null; then
        echo "demo: building Fashion-MNIST $part shards into $SHARDS (split $split)"
        # 30000 training images keep the demo under 5 minutes on 2 cores; the whole test split is "val".
        limit=$([ "$split" = train ] && echo "--limit 30000" || echo "")
        .venv/bin/hcsc-shards build --source "fashion-mnist:$FMNIST:$part" --out "$SHARDS" --split "$split" \
            --workers 2 $limit
    fi
done
echo "demo: training HCSC on Fashion-MNIST (CPU) with configs/demo_fmnist.yaml"
exec .venv/bin/hcsc-train --config configs/demo_fmnist.yaml data.shards="$SHARDS" "$@"
