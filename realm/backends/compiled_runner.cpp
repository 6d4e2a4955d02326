// A compiled decode step (an AOTInductor package) run through PyTorch's dispatcher.
//
// PyTorch's own binding of the package loader (`torch._C._aoti.AOTIModelPackageLoader.run`)
// holds the GIL for the whole step, so while the model computes no other Python thread
// (the HTTP event loop, the guests) can run: their work waits for the step and the step
// waits for theirs. An operator called through `torch.ops` releases the GIL while it runs,
// so the same package run as `torch.ops.realm.run_compiled` lets that work overlap.

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <memory>
#include <string>
#include <vector>

namespace {

struct CompiledPackage : torch::CustomClassHolder {
  explicit CompiledPackage(const std::string& path)
      : loader(std::make_unique<torch::inductor::AOTIModelPackageLoader>(path, "model", false, 1, -1)) {}
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
};

std::vector<at::Tensor> run_compiled(const c10::intrusive_ptr<CompiledPackage>& package,
                                     const std::vector<at::Tensor>& inputs) {
  return package->loader->run(inputs);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(realm, m) {
  m.class_<CompiledPackage>("CompiledPackage").def(torch::init<std::string>());
  m.def("run_compiled", &run_compiled);
}
