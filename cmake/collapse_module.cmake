# collapse_add_backend_module(<target> <sources>...): a dlopen'ed backend module, the way
# libcollapse_cuda.so is built (src/core/backend_registry.cpp loads it). It links its own copy of
# the core objects from libcollapse.a; the version script keeps everything but the
# collapse_cuda_module_* entry points local, so two copies never interpose on each other.
function(collapse_add_backend_module target)
  add_library(${target} MODULE ${ARGN})
  target_include_directories(${target} PRIVATE ${PROJECT_SOURCE_DIR}/src ${LAPACKE_INCLUDE_DIR})
  target_link_libraries(${target} PRIVATE collapse nlohmann_json::nlohmann_json)
  target_compile_definitions(${target} PRIVATE COLLAPSE_VERSION_STRING="${PROJECT_VERSION}")
  target_link_options(${target} PRIVATE
    "LINKER:--version-script=${PROJECT_SOURCE_DIR}/cmake/collapse_cuda_module.map" "LINKER:--no-undefined")
  set_target_properties(${target} PROPERTIES PREFIX "lib"
    LINK_DEPENDS ${PROJECT_SOURCE_DIR}/cmake/collapse_cuda_module.map)
endfunction()
