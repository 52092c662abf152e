// What the C++ autograd nodes of the ops (autograd.cpp, options_autograd.cpp) share.
#pragma once

#include <torch/csrc/autograd/function.h>

#include <memory>
#include <type_traits>

namespace rnnfast {

// A new graph node, held the way the installed torch holds them (the type of Edge::function):
// by c10::intrusive_ptr from torch 2.13 on, by std::shared_ptr before.
template <typename NodeType>
auto make_node() {
  using NodeHandle = decltype(torch::autograd::Edge::function);
  if constexpr (std::is_same_v<NodeHandle, std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<NodeType>();
  } else {
    return c10::make_intrusive<NodeType>();
  }
}

}  // namespace rnnfast
